"""The exported student against its teacher: GGUF file size and generation speed, on the same prompts.

Prints ONE JSON object to stdout; progress lines go to stderr.

What is measured, and why:

- **size**: the student and the teacher are both exported with ``garden export --format gguf --quant q8_0``
  (the file llama.cpp, Ollama and LM Studio load); ``size_ratio`` = student bytes / teacher bytes.
- **speed**: each GGUF file is loaded back and generates greedily, ``--tokens`` new tokens for each of
  ``--prompts`` demo prompts (``min_new_tokens``: no early end), one thread; ``speed_ratio`` = student tokens/s
  / teacher tokens/s. The runtime is llama.cpp (``llama_cpp``) when it is installed, else transformers
  (``gguf_file=``: it dequantises to float32, so the ratio shows what the smaller architecture saves, not what
  q8_0 kernels add).
- **agreement**: the q8_0 student's greedy tokens against the same student unexported (float32): the share
  of positions where they agree (what quantisation changes; transformers runtime only).

The default student is the demo's shape (``prune:builtin:smollm2-135m:layers=10``); ``--student DIR`` takes a
trained one (``garden mission pull ID -o DIR``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from harness.machine import MachineReport  # noqa: E402

TEACHER = "builtin:smollm2-135m"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def prompt_ids(tokenizer: Any, n: int) -> list[list[int]]:
    from garden.data import demo_prompts
    from garden.inference.generate import prompt_ids as encode

    return [encode(tokenizer, p.prompt) for p in demo_prompts()[-n:]]  # the held-out end of the set


def generate(model: Any, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens per second over every prompt (greedy, exactly ``tokens`` new each), and the answers."""
    import torch

    answers, started = [], time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            answers.append(out[0, len(ids) :].tolist())
    return len(prompts) * tokens / (time.perf_counter() - started), answers


def load_gguf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def llama_cpp_rate(path: Path, prompts: list[list[int]], tokens: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=1, verbose=False, n_ctx=1024)
    started = time.perf_counter()
    for ids in prompts:
        llm.reset()
        count = 0
        for _ in llm.generate(ids, temp=0.0):
            count += 1
            if count >= tokens:
                break
    return len(prompts) * tokens / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=f"prune:{TEACHER}:layers=10")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--quant", default="q8_0")
    args = parser.parse_args()

    import torch

    from garden.models.export import export_model
    from garden.models.loading import load_model
    from garden.models.student import PRUNE_SCHEME, build_student, parse_student_ref

    torch.set_num_threads(1)
    machine = MachineReport().start()
    runtime = "llama.cpp" if importlib.util.find_spec("llama_cpp") else "transformers (gguf_file=, dequantised)"
    work = Path(tempfile.mkdtemp(prefix="garden-bench-export-"))
    result: dict[str, Any] = {"benchmark": "export_gguf", "quant": args.quant, "runtime": runtime,
                              "prompts": args.prompts, "tokens": args.tokens}  # fmt: skip
    files: dict[str, Path] = {}
    for name, ref in (("student", args.student), ("teacher", TEACHER)):
        started = time.perf_counter()
        done = export_model(ref, work / f"{name}.gguf", "gguf", args.quant)
        files[name] = done.path
        log(f"exported the {name} ({ref}) as {args.quant}: {done.bytes / 2**20:.1f} MiB in "
            f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        result[name] = {"ref": ref, "bytes": done.bytes, "export_s": round(time.perf_counter() - started, 1)}

    source = (build_student(parse_student_ref(args.student)) if args.student.startswith(PRUNE_SCHEME)
              else load_model(args.student))  # fmt: skip
    prompts = prompt_ids(source.tokenizer, args.prompts)
    for name in ("student", "teacher"):
        if runtime == "llama.cpp":
            rate = llama_cpp_rate(files[name], prompts, args.tokens)
            answers = None
        else:
            model = load_gguf(files[name])
            generate(model, prompts[:1], 2)  # warm-up
            rate, answers = generate(model, prompts, args.tokens)
        result[name]["tokens_per_s"] = round(rate, 2)
        log(f"{name} GGUF: {rate:.1f} tokens/s")
        if name == "student" and answers is not None:
            _, reference = generate(source.model.eval(), prompts, args.tokens)
            same = sum(a == b for x, y in zip(answers, reference, strict=True) for a, b in zip(x, y, strict=True))
            result["student"]["greedy_agreement_with_unexported"] = round(same / (len(prompts) * args.tokens), 4)
    result["size_ratio"] = round(result["student"]["bytes"] / result["teacher"]["bytes"], 4)
    result["speed_ratio"] = round(result["student"]["tokens_per_s"] / result["teacher"]["tokens_per_s"], 3)
    result["machine"] = machine.finish()
    print(json.dumps(result, indent=2))
    for path in files.values():
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
