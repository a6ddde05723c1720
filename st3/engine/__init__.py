"""The integration with transformers: the language-model loop, the prunable cache, scoring, sessions."""
