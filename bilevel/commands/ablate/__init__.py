"""`bilevel ablate`: a grid of runs (pruners x unlearners x solvers x seeds, plus baselines), resumable cell by
cell, and a report people can read (Markdown, CSV, JSON, PNG plots, a self-contained HTML page)."""
