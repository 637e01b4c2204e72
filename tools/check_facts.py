"""Keep the candidate facts a model gets right: ``python tools/check_facts.py --model smollm2-135m``.

A prompt passes when the model's greedy next token is the target's first token
(:func:`ffkv_lens.analysis.causal.check_fact`). A fact is kept with the prompts that pass (at least one);
its held-out paraphrases are kept as they are (they only measure efficacy). The output file starts with a
comment line saying how many of how many candidates passed; the counts are also printed.
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "examples" / "facts"


def main(argv: list[str] | None = None) -> int:
    """Check every candidate on one model and write the facts it predicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or HF folder")
    parser.add_argument("--candidates", default=str(HERE / "candidates.jsonl"), help="candidate fact file")
    parser.add_argument("--out", default=None, help="output fact file (default: examples/facts/<model>.jsonl)")
    args = parser.parse_args(argv)

    import ffkv_lens as fk
    from ffkv_lens.analysis.causal import check_fact, read_facts

    out = Path(args.out or HERE / f"{Path(args.model).name.split('-')[0]}.jsonl")
    candidates = read_facts(args.candidates)
    lens = fk.MemoryLens(fk.load_model(args.model, device="cpu"))
    kept, every_prompt, lines = 0, 0, []
    for fact in candidates:
        table = check_fact(lens, fact)
        passed = [p for p, ok in zip(fact.prompts, table["correct"], strict=True) if ok]
        every_prompt += bool(table["correct"].all())
        predicted = ", ".join(f"{p!r} -> {t!r}" for p, t in zip(fact.prompts, table["predicted_token"], strict=True))
        print(f"{'keep' if passed else 'drop'} {fact.id}: {predicted}")
        if passed:
            kept += 1
            lines.append(json.dumps({**fact.to_dict(), "prompts": passed}, ensure_ascii=False))
    header = (
        f"# {args.model}: {kept} of {len(candidates)} candidate facts predicted on at least one prompt "
        f"({every_prompt} on every prompt); written by tools/check_facts.py from {Path(args.candidates).name}"
    )
    out.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    print(header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
