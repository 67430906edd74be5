"""The bottom floor: errors, graph helpers and the names every layer agrees on.
Imports nothing of moec above it."""
