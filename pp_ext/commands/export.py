"""``pp-ext export``: a pp-ext/DeepSpeed checkpoint as a Hugging Face ``from_pretrained`` folder."""

from __future__ import annotations

import argparse

from . import CommandError

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face folder (safetensors, config, tokenizer)",
        description="Read the per-layer files of a DeepSpeed pipeline checkpoint one by one and write a folder "
        "that AutoModelForCausalLM.from_pretrained loads: safetensors shards (+ index), config.json, "
        "generation_config.json and the tokenizer files saved in the tag's hf_meta/ (a LoRA checkpoint: "
        "PEFT's adapter folder, adapter_config.json and adapter_model.safetensors). The folder is "
        "written aside and renamed into place only when complete.",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="DeepSpeed save dir (its 'latest' tag is exported) or a tag folder",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to write")
    parser.add_argument("--tag", help="export this tag of CHECKPOINT instead of 'latest'")
    parser.add_argument("--dtype", choices=DTYPES, help="cast floating tensors (default: as saved)")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors file, e.g. 500MB or 5GB (default 5GB)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA checkpoint: write the merged full model (W + scale B A, PEFT's "
        "merge_and_unload on its base) instead of the PEFT adapter folder",
    )
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pp_ext.checkpoint.export import (
        ExportError,
        export_checkpoint,
    )  # torch: only when this command runs (pp_ext.commands)

    try:
        out_dir = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            merge=args.merge,
        )
    except ExportError as err:
        raise CommandError(str(err)) from None
    files = sorted(p.name for p in out_dir.iterdir())
    print(f"exported {args.checkpoint} to {out_dir}: {', '.join(files)}")
    return 0
