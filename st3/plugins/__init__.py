"""Integrations of st3 with other tools (each an optional extra; nothing here is imported by `import st3`)."""
