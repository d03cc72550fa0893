"""Reporting: gather the per-job result JSONs into tidy tables (CSV, Markdown) and figures.

``result_format`` declares what a result JSON holds; ``tables.gather_results`` turns result files
into one tidy frame (one row per file and metric); ``tables.write_tables`` and
``plots.plot_ppl_vs_bits`` render that frame.
"""
