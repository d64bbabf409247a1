"""``python -m caiman_asr_train.recipes.demo_corpus``: make the demo corpus (see ``corpus``)."""

from caiman_asr_train.recipes.demo_corpus.corpus import main
from caiman_asr_train.utils.cli import run_cli

run_cli(main)
