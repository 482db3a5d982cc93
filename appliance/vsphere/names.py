"""VM names as vSphere keeps them, and the datastore folder a new VM's files go in.

vCenter stores an entity's name with "/" as %2f, "\\" as %5c and "%" as %25 (a "%" that
already starts such an escape is kept) and returns it that way; the vSphere Client shows it
unescaped, and inventory paths (SearchIndex.FindByInventoryPath) use the stored form, so a
VM named "web/db" is DC/vm/web%2fdb. Stillpoint shows and matches the unescaped name.
"""

from __future__ import annotations

import re

_TO_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})|[/\\]")
_ESCAPED = re.compile(r"%(2[fF]|5[cC]|25)")
_ESCAPES = {"%": "%25", "/": "%2f", "\\": "%5c"}
_UNESCAPES = {"2f": "/", "5c": "\\", "25": "%"}
# What a datastore path or another tool's copy of it cannot hold well.
_NOT_IN_FOLDER = re.compile(r'[\x00-\x1f\x7f/\\\[\]%:*?"<>|]')


def escape_name(name: str) -> str:
    """The name as vCenter stores it (idempotent: vCenter does the same to what it gets)."""
    return _TO_ESCAPE.sub(lambda m: _ESCAPES[m[0]], name)


def display_name(stored: str) -> str:
    """The name as the vSphere Client shows it."""
    return _ESCAPED.sub(lambda m: _UNESCAPES[m[1].lower()], stored)


def datastore_folder(name: str) -> str:
    """The datastore folder for a new VM named `name`: its shown name with what a datastore
    path cannot hold replaced by "_" ("web/db copy" -> "web_db copy")."""
    return _NOT_IN_FOLDER.sub("_", display_name(name)).strip(" .") or "vm"
