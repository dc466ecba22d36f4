"""The child side of the sandbox: standard library only, imported by file name inside the sandboxed interpreter."""
