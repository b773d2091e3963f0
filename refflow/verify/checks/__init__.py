"""Check modules; importing this package registers every check.

Each module here holds the checks of one part of the notes.  New modules are
picked up automatically, in alphabetical order.
"""
import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
