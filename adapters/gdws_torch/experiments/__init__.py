"""Experiments built from the library: the embedded demo and the robustness frontier sweep."""
