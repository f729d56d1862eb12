"""The enkwatch performance benchmark (`python -m bench`); see docs/performance.md."""
