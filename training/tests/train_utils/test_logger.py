"""Training logs: train.log holds what the console shows, warnings and errors included, one line each."""

import warnings

from caiman_asr_train.train_utils.logger import LOG_FILE, TrainLogger


def test_train_log_holds_info_error_and_warning_lines(tmp_path, capsys):
    before = warnings.showwarning
    log = TrainLogger(tmp_path)
    try:
        log.info("step 1/2 loss 3.000")
        log.error("error: hardware export of x.pt failed")
        # pytest records warnings itself; re-install what the open logger installed.
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = log._show_warning
            warnings.warn("the EMA weights match\n  no FPGA variant", stacklevel=1)
    finally:
        log.close()
    captured = capsys.readouterr()
    assert captured.out == "step 1/2 loss 3.000\n"
    assert (
        captured.err
        == "error: hardware export of x.pt failed\nwarning: the EMA weights match no FPGA variant\n"
    )
    text = (tmp_path / LOG_FILE).read_text()
    for line in (
        "step 1/2 loss 3.000",
        "error: hardware export of x.pt failed",
        "warning: the EMA weights match no FPGA variant",
    ):
        assert text.count(line) == 1
    assert warnings.showwarning is before


def test_other_ranks_log_nothing(tmp_path, capsys):
    log = TrainLogger(tmp_path, enabled=False)
    log.info("x")
    log.error("error: y")
    log.close()
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / LOG_FILE).exists()
