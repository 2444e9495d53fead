"""The chat page (GET / and /ui): static HTML, CSS and JS shipped as package data; routes.py
serves them."""
