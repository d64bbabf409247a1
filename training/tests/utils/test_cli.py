"""Command-line entry points: one line per error or warning, exit status 2 for user mistakes."""

import subprocess
import sys
import textwrap


def run(body: str) -> subprocess.CompletedProcess:
    script = (
        textwrap.dedent(
            """
        import warnings
        from caiman_asr_train.core.errors import ConfigError
        from caiman_asr_train.utils.cli import run_cli

        def main():
        """
        )
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "\nrun_cli(main)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def test_a_warning_is_one_line_without_its_source_line():
    result = run('warnings.warn("weights look odd;\\n  check them")\nreturn 0')
    assert result.returncode == 0
    assert result.stderr == "warning: weights look odd; check them\n"


def test_a_user_error_is_one_line_and_exit_2():
    result = run('raise ConfigError("config.yaml: key x is unknown")')
    assert result.returncode == 2
    assert result.stderr == "error: config.yaml: key x is unknown\n"
