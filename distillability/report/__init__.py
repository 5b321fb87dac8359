"""Reports: the protection/distillability report (JSON, markdown, self-contained HTML)."""
