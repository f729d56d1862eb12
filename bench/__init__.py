"""The enkwatch performance benchmark (`python -m bench`); see bench/README-section.md."""
