"""Where the repository is, so that default paths work from any current directory."""

from pathlib import Path

# training/caiman_asr_train/utils/paths.py -> the repository root (README.md, train.sh, datasets/, results/).
REPO_ROOT = Path(__file__).resolve().parents[3]
