"""The floor: typed params, atomic writes, content hashing; imports nothing else of pipeline."""
