"""What the analysis shows: summaries of the request table, the verdict in words, figures and
the report in HTML / Markdown / JSON."""
