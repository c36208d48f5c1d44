"""Parameters, FLOPs and overhead vs `none` of one backbone with every attention variant.

    python scripts/model_stats.py                        # ResNet-50, 1000 classes, 224 px
    python scripts/model_stats.py model=resnet20 data=cifar10 csv=stats.csv
    python scripts/model_stats.py variants=[none,cbam] attention.reduction=8

Overrides of attention.* apply to every row; Markdown goes to stdout.
"""

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cbam.cli import attention_presets, entry_point, run_hydra
from cbam.models import build_model, count_flops, count_params
from cbam.report.render import markdown_table, write_csv

COLUMNS = ["attention", "params", "params vs none", "GFLOPs", "GFLOPs vs none"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="model_stats")
@entry_point
def main(cfg: DictConfig) -> None:
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("attention=", "variants="))]
    base = compose("model_stats", overrides=[*overrides, "attention=none"])
    base_model = build_model(base)
    base_params = count_params(base_model)
    base_flops = count_flops(base_model, cfg.data.in_chans, cfg.data.image_size)
    rows = []
    for name in attention_presets(cfg.variants):
        model = build_model(compose("model_stats", overrides=[*overrides, f"attention={name}"]))
        params, flops = count_params(model), count_flops(model, cfg.data.in_chans, cfg.data.image_size)
        rows.append(
            {
                "attention": name,
                "params": f"{params:,}",
                "params vs none": f"{params - base_params:+,} ({100 * (params / base_params - 1):+.2f}%)",
                "GFLOPs": f"{flops / 1e9:.3f}",
                "GFLOPs vs none": f"{100 * (flops / base_flops - 1):+.2f}%",
            }
        )
    print(
        f"{cfg.model.block} ResNet, layers {list(cfg.model.layers)}, stem {cfg.model.stem}; "
        f"{cfg.data.num_classes} classes, {cfg.data.in_chans}x{cfg.data.image_size}x{cfg.data.image_size} input. "
        "FLOPs: torch.utils.flop_counter (2 per multiply-add; elementwise ops not counted)."
    )
    print(markdown_table(rows, COLUMNS))
    if cfg.csv:
        write_csv(cfg.csv, rows, COLUMNS)


if __name__ == "__main__":
    run_hydra(main)
