"""The pretraining set: written when missing, checked against the config, described for the model card."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rlds.config import ConfigError
from rlds.pretrain.config import PretrainConfig

log = logging.getLogger("rlds.pretrain")


def ensure_data(cfg: PretrainConfig) -> dict:
    """Write the pretraining set if `data_path` does not exist; describe the set in use.

    An existing rlds-written set must match the config (rows, seed, bias), else the model card would
    describe data the model never saw; an external image-caption set is used as it is."""
    import pyarrow.parquet as pq

    from rlds.data.pretrain_set import write_pretrain_set

    path = Path(cfg.data_path)
    want = {"n": cfg.data_rows, "seed": cfg.data_seed, "bias": cfg.colour_bias, "bias_colour": cfg.bias_colour}
    if not path.exists():
        log.info("writing the pretraining set: %d rows to %s (about a minute per 60,000 rows)", cfg.data_rows, path)
        t0 = time.time()
        write_pretrain_set(path, cfg.data_rows, seed=cfg.data_seed, bias=cfg.colour_bias,
                           bias_colour=cfg.bias_colour)
        log.info("wrote %s in %.0f s", path, time.time() - t0)
    if path.is_file():
        meta = (pq.ParquetFile(path).schema_arrow.metadata or {}).get(b"rlds.shapes")
        if meta is not None:
            have = json.loads(meta)
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                details = ", ".join(f"{k}: file {a!r}, config {b!r}" for k, (a, b) in diff.items())
                raise ConfigError(f"data_path {path} holds another ShapesWorld set ({details}); delete it to "
                                  "have it rewritten, or point data_path at a new file")
            return {"path": str(path), "rows": have["n"], "seed": have["seed"], "bias": have["bias"],
                    "bias_colour": have["bias_colour"], "kind_weights": have.get("kind_weights"),
                    "shapesworld": True}
    from rlds.data.pretrain_set import PretrainSet
    return {"path": str(path), "rows": len(PretrainSet(path)), "shapesworld": False}
