"""The run report: results tables and the self-contained HTML report."""
