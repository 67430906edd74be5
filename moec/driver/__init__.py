"""The top floor, at compile time: the `moec` command line, capture of the
user's model, the compiler and its pass pipeline. Nothing below imports it."""
