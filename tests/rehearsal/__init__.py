"""The paper configs rehearsed offline on tiny models (tests/test_rehearsal.py): what goes into the
hub cache (``hub``, ``tasks``, all of it at once: ``cache``) and each config shrunk in sizes only
(``shrink``)."""
