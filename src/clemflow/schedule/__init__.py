"""When things happen: clocks, the absolute timeline of a protocol, and (later) the runner."""
