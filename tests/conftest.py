import os
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import cbam  # noqa: F401  the config resolvers (conf/model/ derives the stem from the image size)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# W&B must never reach for the network in tests: with a key and no network, wandb.init blocks ~100 s.
# Its home and cache go to a temp dir so a developer's own W&B settings are neither read nor touched.
_WANDB_HOME = tempfile.mkdtemp(prefix="cbam-tests-wandb-")
os.environ.update(
    WANDB_MODE="offline",
    WANDB_DIR=_WANDB_HOME,
    WANDB_CONFIG_DIR=_WANDB_HOME,
    WANDB_CACHE_DIR=_WANDB_HOME,
    WANDB_DATA_DIR=_WANDB_HOME,
    WANDB_SILENT="true",
)
os.environ.pop("WANDB_API_KEY", None)


def compose_config(config_name: str, *overrides: str):
    """The real config tree, composed as the entry point would compose it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


@pytest.fixture
def compose_cfg():
    return compose_config
