"""The command line: click commands + rich rendering. The only layer that touches the terminal."""
