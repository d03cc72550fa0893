"""The paper configs rehearsed offline on tiny models (tests/test_rehearsal.py): a hub cache under
the configs' hub ids (``hub``), each config shrunk in sizes only (``shrink``), and a network guard
for the Snakemake run (``guard/sitecustomize.py``)."""
