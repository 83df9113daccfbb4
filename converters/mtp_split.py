"""``split-mtp`` / ``merge-mtp``: cut the multi-token-prediction layers (``num_hidden_layers``..) out of a
checkpoint into their own folder, and put them back. Tensors are byte copies streamed from mmap.

``OUT/main`` holds embed, layers 0..N-1, norm and head with ``num_nextn_predict_layers: 0``;
``OUT/mtp`` holds only the MTP layers with the original config (every field kept) plus the marker
``"dsv3tools_part": "mtp"``, which ``Checkpoint.expected()`` reads as "only the MTP layers", so both
folders validate. Output shards follow the input shard boundaries (empty ones dropped). Merging
writes main's shards then mtp's shards and restores the original config (the mtp config without the
marker). Default outputs: ``<model>-split`` for split, ``<X>-merged`` for merge where ``X`` is the
parent of ``--main`` without a trailing ``-split``.
"""

from __future__ import annotations

from pathlib import Path

from dsv3tools.checkpoint.layout import layer_of
from dsv3tools.checkpoint.reader import Checkpoint
from dsv3tools.checkpoint.writer import OutSpec, ShardPlan, WriteJob, execute, non_weight_files, shard_name
from dsv3tools.converters.convert import source_fingerprint
from dsv3tools.converters.tensor_io import ShardReader
from dsv3tools.errors import DSV3Error

PART_KEY = "dsv3tools_part"


class CopyProducer:
    """Each output tensor is the stored tensor of the same name in one of the source folders."""

    def __init__(self, *cks: Checkpoint):
        self.readers = [(set(ck.weight_map), ShardReader(ck.path, ck.infos())) for ck in cks]

    def __call__(self, spec: OutSpec):
        for names, reader in self.readers:
            if spec.name in names:
                return reader.get(spec.name)
        raise KeyError(spec.name)


def _copy_shards(
    groups: list[list[str]], infos: dict, offset: int = 0, total: int | None = None
) -> list[ShardPlan]:
    groups = [g for g in groups if g]
    total = total or len(groups)
    return [
        ShardPlan(shard_name(offset + i, total), [OutSpec(n, infos[n].dtype, infos[n].shape) for n in g])
        for i, g in enumerate(groups)
    ]


def _is_mtp(name: str, n_layers: int) -> bool:
    layer = layer_of(name)
    return layer is not None and layer >= n_layers


def mtp_params(ck: Checkpoint) -> tuple[int, int]:
    """Parameters of the MTP layers (logical weights, scales not counted): total and without the
    embed/head copies."""
    n = ck.config.num_hidden_layers
    ws = [w for w in ck.expected() if w.layer is not None and w.layer >= n]
    total = sum(w.numel for w in ws)
    copies = sum(w.numel for w in ws if w.name.endswith(("embed_tokens.weight", "shared_head.head.weight")))
    return total, total - copies


def _check_out(out: Path, allowed: set[str]) -> None:
    if out.exists() and (not out.is_dir() or any(p.name not in allowed for p in out.iterdir())):
        raise DSV3Error(f"{out}: exists and holds other files; choose another --out or empty it")


def split_jobs(model: str | Path, out: str | Path) -> tuple[Checkpoint, WriteJob, WriteJob]:
    """Plan split-mtp (validates the source; writes nothing)."""
    ck = Checkpoint(model)
    cfg = ck.config
    if ck.config.raw.get(PART_KEY):
        raise DSV3Error(
            f"{ck.path}: is already a split part ({ck.config.raw[PART_KEY]}); point --model at a whole checkpoint"
        )
    if not cfg.mtp_layers:
        raise DSV3Error(f"{ck.path}: num_nextn_predict_layers is 0: there is no MTP layer to split off")
    ck.validate()
    out = Path(out)
    _check_out(out, {"main", "mtp"})
    infos = ck.infos()
    n = cfg.num_hidden_layers
    main_g = [[t for t in ck.names_in(s) if not _is_mtp(t, n)] for s in ck.shards]
    mtp_g = [[t for t in ck.names_in(s) if _is_mtp(t, n)] for s in ck.shards]
    producer = CopyProducer(ck)
    extra = non_weight_files(ck.path)
    main = WriteJob(
        out / "main",
        _copy_shards(main_g, infos),
        producer,
        cfg.to_dict(num_nextn_predict_layers=0),
        "split-mtp",
        {"part": "main", "source": source_fingerprint(ck)},
        extra_files=extra,
    )
    mtp_cfg = dict(cfg.to_dict(**{PART_KEY: None}), **{PART_KEY: "mtp"})
    mtp = WriteJob(
        out / "mtp",
        _copy_shards(mtp_g, infos),
        producer,
        mtp_cfg,
        "split-mtp",
        {"part": "mtp", "source": source_fingerprint(ck)},
        extra_files=extra,
    )
    return ck, main, mtp


def _job_summary(job: WriteJob) -> dict:
    return {
        "out": str(job.out_dir),
        "tensors": sum(len(s.tensors) for s in job.shards),
        "bytes": job.total_bytes,
        "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": s.nbytes} for s in job.shards],
    }


def split_mtp(model: str | Path, out: str | Path, dry_run: bool = False) -> dict:
    """Write ``out/main`` and ``out/mtp`` (or, with ``dry_run``, only report the plan)."""
    ck, main, mtp = split_jobs(model, out)
    total, unique = mtp_params(ck)
    result = {
        "model": str(ck.path),
        "out": str(Path(out)),
        "dry_run": dry_run,
        "mtp_layers": ck.config.mtp_layers,
        "mtp_params": total,
        "mtp_params_unique": unique,
        "main": _job_summary(main),
        "mtp": _job_summary(mtp),
        "bytes": main.total_bytes + mtp.total_bytes,
    }
    if not dry_run:
        for job in (main, mtp):
            execute(job)
        for key, job in (("main", main), ("mtp", mtp)):
            Checkpoint(job.out_dir).validate()
            result[key]["valid"] = True
    return result


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("num_nextn_predict_layers", PART_KEY)}


def merge_jobs(
    main_dir: str | Path, mtp_dir: str | Path, out: str | Path
) -> tuple[Checkpoint, Checkpoint, WriteJob]:
    """Plan merge-mtp: main's shards, then mtp's, under the original config."""
    main, mtp = Checkpoint(main_dir), Checkpoint(mtp_dir)
    if mtp.config.raw.get(PART_KEY) != "mtp" or not mtp.config.mtp_layers:
        raise DSV3Error(
            f'{mtp.path}: not an MTP part written by split-mtp (no "{PART_KEY}": "mtp" in config.json)'
        )
    if main.config.raw.get(PART_KEY) or main.config.num_nextn_predict_layers != 0:
        raise DSV3Error(
            f"{main.path}: not a main part (num_nextn_predict_layers must be 0); pass the split's main folder"
        )
    a, b = _comparable(main.config.raw), _comparable(mtp.config.raw)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise DSV3Error(
            f"{main.path} and {mtp.path}: configs differ in {', '.join(diff)}; they come from different checkpoints"
        )
    main.validate()
    mtp.validate()
    out = Path(out)
    _check_out_not_input(out, main, mtp)
    groups_main = [main.names_in(s) for s in main.shards]
    groups_mtp = [mtp.names_in(s) for s in mtp.shards]
    total = len(groups_main) + len(groups_mtp)
    shards = _copy_shards(groups_main, main.infos(), 0, total) + _copy_shards(
        groups_mtp, mtp.infos(), len(groups_main), total
    )
    config = mtp.config.to_dict(**{PART_KEY: None})
    job = WriteJob(
        out,
        shards,
        CopyProducer(main, mtp),
        config,
        "merge-mtp",
        {"source": [source_fingerprint(main), source_fingerprint(mtp)]},
        extra_files=non_weight_files(main.path),
    )
    return main, mtp, job


def _check_out_not_input(out: Path, *cks: Checkpoint) -> None:
    for ck in cks:
        if out.resolve() == ck.path.resolve():
            raise DSV3Error(f"--out {out} is an input folder; choose another --out")


def default_merge_out(main_dir: str | Path) -> Path:
    """``X-split/main`` -> ``X-merged`` (beside the split folder)."""
    parent = Path(main_dir).resolve().parent
    base = parent.name.removesuffix("-split") or "model"
    return parent.parent / f"{base}-merged"


def merge_mtp(main_dir: str | Path, mtp_dir: str | Path, out: str | Path, dry_run: bool = False) -> dict:
    """Write the merged checkpoint (or, with ``dry_run``, only report the plan)."""
    main, mtp, job = merge_jobs(main_dir, mtp_dir, out)
    result = {"main": str(main.path), "mtp": str(mtp.path), "dry_run": dry_run, **_job_summary(job)}
    if not dry_run:
        execute(job)
        Checkpoint(job.out_dir).validate()
        result["valid"] = True
    return result
