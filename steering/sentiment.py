"""The sentiment positive control: a contrast set with a direction to steer along, made up for
this project (no dataset), and its held-out read-outs.

    python -m steering.sentiment OUT_DIR     # pairs.csv, readout.json, open_prompts.json

- pairs.csv: contrast pairs (idx, plus_prompt, minus_prompt, label 1, template): the same made-up
  subject under TEMPLATES, the plus side loving it, the minus side hating it. Every label is 1
  (the plus side is always the behaviour): generate_vectors_from_cache.py takes the mean of
  plus - minus.
- readout.json: word items for scripts/steer.py: neutral sentence openings (none of them a
  template above) scored p(" good") / (p(" good") + p(" bad")) for the next token.
- open_prompts.json: neutral prompts for scripts/generate.py --sweep.
"""
import csv
import json
import os
import sys

SUBJECTS = ["the weather", "this book", "my new job", "the city", "the music", "our neighbours",
            "this recipe", "the train ride", "the garden", "the meeting"]
TEMPLATES = {  # name: (plus, minus)
    "love": ("I love {s}.", "I hate {s}."),
    "feel": ("Thinking about {s} makes me so happy.", "Thinking about {s} makes me so miserable."),
    "review": ("Honestly, {s} was wonderful, the best part of my week.",
               "Honestly, {s} was awful, the worst part of my week."),
}
READOUT = ["The food at the new place was", "All in all, the trip was", "My week has been",
           "The first chapter of the novel is", "The service at the hotel was",
           "The way the day turned out was", "Our old car is", "The concert last night was"]
OPEN_PROMPTS = ["Yesterday I went to the market and", "Let me tell you about my morning:",
                "The letter on the table said"]


def pairs() -> list:
    """[(idx, plus, minus, template)]: every subject under every template."""
    out = []
    for name, (plus, minus) in TEMPLATES.items():
        for s in SUBJECTS:
            out.append((len(out), plus.format(s=s), minus.format(s=s), name))
    return out


def write(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "pairs.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["idx", "plus_prompt", "minus_prompt", "label", "template"])
        w.writerows([i, p, m, 1, t] for i, p, m, t in pairs())
    with open(os.path.join(folder, "readout.json"), "w", encoding="utf-8") as f:
        json.dump([{"prompt": p, "positive": " good", "negative": " bad"} for p in READOUT], f,
                  indent=1)
    with open(os.path.join(folder, "open_prompts.json"), "w", encoding="utf-8") as f:
        json.dump(OPEN_PROMPTS, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: python -m steering.sentiment OUT_DIR", file=sys.stderr)
        sys.exit(2)
    write(sys.argv[1])
