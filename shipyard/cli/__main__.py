from shipyard.cli import entrypoint

entrypoint()
