"""bench/results.md from the rows benchmark_pretrain.py appended to bench/results.jsonl (or another file).

    python bench/summarize.py [bench/results.jsonl ...] --output bench/results.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def machine(row: dict) -> str:
    name = row.get("device_name", "?")
    where = f"{name} ({row.get('threads')} threads)" if row.get("device") == "cpu" else name
    if row.get("mode") == "finetune":
        return f"{where}, torch {row.get('torch')}, timm {row.get('timm', '?')}"
    return f"{where}, torch {row.get('torch')}, transformers {row.get('transformers', '?')}"


def row_note(row: dict) -> str:
    """The row's own note, and a fine-tuning row's drop path and classes where they differ from the caption's."""
    notes = [row["note"]] if row.get("note") else []
    if row.get("patch_embed", "conv") != "conv":
        notes.append("patch embedding as one matmul on the unfolded patches")
    if row.get("inductor"):
        notes.append(f"Inductor {row['inductor']}")
    if row.get("mode") == "finetune" and (row.get("drop_path", 0.1), row.get("num_classes", 1000)) != (0.1, 1000):
        notes.append(f"drop path {row.get('drop_path')}, {row.get('num_classes')} classes")
    return "; ".join(notes)


def model_table(rows: list[dict], commands: list[str], reference: str = "hf", label: str = "🤗") -> list[str]:
    """Ours against the ``reference`` rows (impl hf: 🤗 transformers, timm: timm) of the same command."""
    lines = [f"| machine | model | batch | precision | compiled | checkpointing | ours img/s | {label} img/s | "
             f"ours / {label} | MFU ours | MFU {label} | step memory ours / {label} (GiB) | note | cmd |", "|" + "---|" * 14]
    pending = {}
    for row in rows:
        key = (row["command"], row["model"], row["batch_size"], row["precision"], row_note(row))
        pending.setdefault(key, {})[row["impl"]] = row
    for (command, model, batch, precision, note), pair in pending.items():
        ours, hf = pair.get("ours"), pair.get(reference)
        first = ours or hf
        commands.append(command)

        def fmt(row, key, pattern="{}"):
            return pattern.format(row[key]) if row and row.get(key) is not None else "—"

        ratio = f"**{hf['step_time_ms'] / ours['step_time_ms']:.2f}x**" if ours and hf else "—"  # (images/s are rounded)
        memory = f"{fmt(ours, 'memory_gib')} / {fmt(hf, 'memory_gib')}"
        precision += {True: " (TF32)", False: " (no TF32)"}.get(first.get("tf32"), "")  # fp32 on a GPU
        lines.append(f"| {machine(first)} | {model} | {batch} | {precision} | {first.get('compile', False)} | "
                     f"{first.get('gradient_checkpointing', False)} | {fmt(ours, 'images_per_sec')} | "
                     f"{fmt(hf, 'images_per_sec')} | {ratio} | {fmt(ours, 'mfu', '{:.1%}')} | {fmt(hf, 'mfu', '{:.1%}')} | "
                     f"{memory} | {note} | [{len(commands)}] |")
    return lines


def scope_table(rows: list[dict], commands: list[str]) -> list[str]:
    """One line per command: images/s of each compile scope, and what the regions add over the blocks."""
    scopes = ("eager", "blocks", "regions", "whole")
    lines = ["| machine | model | batch | precision | " + " | ".join(f"{scope} img/s" for scope in scopes) +
             " | regions / blocks | MFU regions | note | cmd |", "|" + "---|" * 12]
    runs = {}
    for row in rows:  # (the same command on two machines makes two lines)
        runs.setdefault((row["command"], row["device_name"], row["torch"]), {})[row["impl"]] = row
    for (command, _, _), run in runs.items():
        commands.append(command)
        first = next(iter(run.values()))
        rates = " | ".join(str(run[scope]["images_per_sec"]) if scope in run else "—" for scope in scopes)
        gain = (f"**{run['blocks']['step_time_ms'] / run['regions']['step_time_ms']:.2f}x**"
                if "blocks" in run and "regions" in run else "—")
        mfu = f"{run['regions']['mfu']:.1%}" if run.get("regions", {}).get("mfu") is not None else "—"
        lines.append(f"| {machine(first)} | {first['model']} | {first['batch_size']} | {first['precision']} | {rates} | "
                     f"{gain} | {mfu} | {first.get('note', '')} | [{len(commands)}] |")
    return lines


def pipeline_table(rows: list[dict], commands: list[str]) -> list[str]:
    lines = ["| machine | what | data | JPEG decode | batch | workers | img/s | note | cmd |", "|" + "---|" * 9]
    for row in rows:
        commands.append(row["command"])
        what = "loader only" if row["mode"] == "data" else f"loader + our step ({row['model']}, {row['precision']})"
        data = row.get("path_to_data") or row.get("dataset")
        decode = {"folder": row.get("decode", "cpu") + (", ahead" if row.get("decode_ahead") else ""),
                  "cache": "none: pixel cache"}.get(row.get("dataset"), "—")
        notes = [row["note"]] if row.get("note") else []
        if "batches_per_epoch" in row:
            notes.append(f"{row['batches_per_epoch']} batch{'es' if row['batches_per_epoch'] != 1 else ''} per epoch, "
                         "epochs chained")
        if "worker_ms_per_image" in row:
            notes.append(f"a worker spends {row['worker_ms_per_image']} ms per image")
        if "max_abs_diff_vs_cpu_decode" in row:
            notes.append(f"views differ from the CPU path's by {row['mean_abs_diff_vs_cpu_decode']} levels on average "
                         f"(max {row['max_abs_diff_vs_cpu_decode']})")
        lines.append(f"| {machine(row)} | {what} | {data} | {decode} | {row['batch_size']} | {row['num_workers']} | "
                     f"{row['images_per_sec']} | {'; '.join(notes)} | [{len(commands)}] |")
    return lines


def command_number(commands: list[str], command: str) -> int:
    """The command's number in the page's command list (added on first use), for a row's [n] link."""
    if command not in commands:
        commands.append(command)
    return commands.index(command) + 1


def decode_table(rows: list[dict], commands: list[str]) -> list[str]:
    lines = ["| machine | route | batch | KB per file | img/s | CPU ms per image | cmd |", "|" + "---|" * 7]
    for row in rows:
        lines.append(f"| {row['device_name']}, torch {row['torch']} | {row['route']} | {row['batch_size']} | "
                     f"{row['mean_kb_per_file']} | {row['images_per_sec']} | {row['cpu_ms_per_image']} | "
                     f"[{command_number(commands, row['command'])}] |")
    return lines


def attention_table(rows: list[dict], commands: list[str]) -> list[str]:
    lines = ["| machine | model | part | (batch, heads, tokens, head dim) | backend | ms per call | ms per step (all blocks) "
             "| cmd |", "|" + "---|" * 8]
    for row in rows:
        lines.append(f"| {row['device_name']}, torch {row['torch']} | {row['model']} | {row['part']} | "
                     f"{tuple(row['shape'])} | {row['backend']} | {row['ms_per_call']} | {row['ms_per_step_all_blocks']} | "
                     f"[{command_number(commands, row['command'])}] |")
    return lines


def memory_table(rows: list[dict], commands: list[str]) -> list[str]:
    columns = sorted({(r["model"], r["precision"], r["gradient_checkpointing"], r["kind"].split(":")[0],
                       machine(r)) for r in rows})
    batches = sorted({r["micro_batch"] for r in rows})
    value = {(r["model"], r["precision"], r["gradient_checkpointing"], r["kind"].split(":")[0], machine(r),
              r["micro_batch"]): r["memory_gib"] for r in rows}
    for command in dict.fromkeys(r["command"] for r in rows):
        commands.append(command)
    heads = [f"{m} {p}{' + ckpt' if c else ''} ({k})" for m, p, c, k, _ in columns]
    lines = ["| micro-batch | " + " | ".join(heads) + " |", "|---|" + "---|" * len(columns)]
    for batch in batches:
        lines.append(f"| {batch} | " + " | ".join(str(value.get((*col, batch), "")) for col in columns) + " |")
    lines.append("")
    lines.append("Machines: " + "; ".join(sorted({col[4] for col in columns})) + ".")
    return lines


def optimizer_table(rows: list[dict], commands: list[str]) -> list[str]:
    lines = ["| machine | model | parameters | AdamW | step ms | cmd |", "|" + "---|" * 6]
    for row in rows:
        lines.append(f"| {machine(row)} | {row['model']} | {row['parameters'] / 1e6:.0f}M | {row['impl']} | "
                     f"{row['step_time_ms']} | [{command_number(commands, row['command'])}] |")
    return lines


def script_table(rows: list[dict], commands: list[str]) -> list[str]:
    lines = ["| machine | script | model | batch | precision | compiled | data | img/s (median window) | windows | cmd |",
             "|" + "---|" * 10]
    for row in rows:
        lines.append(f"| {machine(row)} | {row['script']} | {row['model']} | {row['batch_size']} | {row['precision']} | "
                     f"{'yes' if row['compile'] else 'no'} | {row['data']} | {row['images_per_sec']:,.0f} | "
                     f"{', '.join(f'{r:,.0f}' for r in row['images_per_sec_windows'])} | "
                     f"[{command_number(commands, row['command'])}] |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", default=["bench/results.jsonl"], help="JSON-lines files of result rows.")
    parser.add_argument("--output", default="bench/results.md", help="Markdown file to write.")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for path in args.inputs for line in Path(path).read_text().splitlines() if line.strip()]
    commands: list[str] = []
    text = ["# Benchmark results", "",
            f"Generated by `python bench/summarize.py {' '.join(args.inputs)}` from the rows "
            "`bench/benchmark_pretrain.py --output` appended; every row names its machine and command.", "",
            "## Training step: this project's MAE vs 🤗 transformers' ViTMAEForPreTraining", "",
            "Same config, same process, alternating rounds (each model first in every other round since the "
            "fine-tuning rows were added; ours first in every round before), synthetic images on the device; median "
            "round. MFU = model "
            "FLOPs per image (3 x forward, counted from the shapes; see `mae_flops_per_image`) x images/s / the "
            "device's dense peak (H100: 989.4 TFLOP/s bf16, 494.7 fp32 on TF32 tensor cores, 66.9 plain fp32; none "
            "for a CPU). Compiled rows compile both models (🤗's whole model; ours as --compile does: by regions since commit 6b09eef, block by block "
            "before, which is how rows [2] and [5] ran). Step memory: peak allocated during the steps above what was "
            "resident before, plus weights and AdamW moments.", "",
            *model_table([r for r in rows if r.get("mode") == "model"], commands), "",
            "## Fine-tuning step: this project's ViT classifier vs timm's VisionTransformer", "",
            "`--mode finetune`: finetune_classifier.py's model (cls token, global average pooling + fc_norm, drop path "
            "0.1 and 1,000 classes unless the note says otherwise) and timm's `VisionTransformer` built the same way; cross-entropy with label smoothing, "
            "AdamW; otherwise as above (MFU: `vit_flops_per_image`). Compiled rows: ours block by block, as "
            "finetune_classifier.py's --compile; timm's whole model.", "",
            *model_table([r for r in rows if r.get("mode") == "finetune"], commands, "timm", "timm"), "",
            "## What --compile's scope is worth", "",
            "`--mode scope`: our pretraining step eager, with only its transformer blocks compiled, with the blocks and "
            "the regions between them compiled (what `--compile` does), and compiled as one whole-model graph (not "
            "used by the scripts: DDP could no longer overlap its all-reduce with each block's backward pass); same "
            "weights, images and masks, alternating rounds, median round.", "",
            *scope_table([r for r in rows if r.get("mode") == "scope"], commands), "",
            "## Input pipeline", "",
            "pretrain_mae.py's training loader (same samples, transform, sampler and loader settings) without the model "
            "(`--mode data`) and feeding our step (`--mode both`). Rows noted \"epochs chained\" run the sampler's "
            "epochs in one iterator, so the workers stay busy across an epoch's end as through almost all of an ImageNet "
            "epoch; earlier rows ran epoch by epoch, which on a set with fewer batches per epoch than workers keeps "
            "workers idle (the two x86_64 rows with 1 batch per epoch show the size of it).", "",
            *pipeline_table([r for r in rows if r.get("mode") in ("data", "both")], commands), "",
            "## The training script end to end", "",
            "The images/s the script's own metrics.jsonl reports per logging window (loader, step, logging and the "
            "finite-loss check together), after the window that includes compilation.", "",
            *script_table([r for r in rows if r.get("mode") == "script"], commands), "",
            "## JPEG decoding routes", "",
            "`bench/benchmark_decode.py`: 500x375 quality-90 JPEGs to 224x224 random-resized crops (uint8, stacked), "
            "batches of 256 after one warm-up batch. The CPU routes run on one thread (a loader worker's rate); the "
            "GPU routes resize the crops on the GPU one by one. CPU ms per image: host CPU time the route spends.", "",
            *decode_table([r for r in rows if r.get("mode") == "decode"], commands), "",
            "## Attention backends", "",
            "`bench/benchmark_attention.py`: forward + backward of `scaled_dot_product_attention` on the MAE's "
            "encoder (cls + visible patches) and decoder (cls + every patch) shapes, each backend forced.", "",
            *attention_table([r for r in rows if r.get("mode") == "attention"], commands), "",
            "## Memory against micro-batch", "",
            *memory_table([r for r in rows if r.get("mode") == "memory"], commands), "",
            "## AdamW's step alone", "",
            "`--mode optimizer`: the fused kernel the scripts use (`engine.optim.build_adamw`) against torch's default "
            "implementation, random gradients, median of alternating rounds.", "",
            *optimizer_table([r for r in rows if r.get("mode") == "optimizer"], commands), "",
            "## Commands", "", *[f"{i}. `{command}`" for i, command in enumerate(commands, 1)], ""]
    Path(args.output).write_text("\n".join(text))
    print(f"wrote {args.output} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
