"""When things happen: clocks, the absolute timeline of a protocol, and the runner that walks it
(with its journal-based resume, operator prompts and pause/abort control)."""
