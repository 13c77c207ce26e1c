"""The folders an index holds: their names, how a photo's path is shown, and what a change rebuilds.

An index holds one folder or several. Each has a name no other folder of the index has (its own
name, numbered on a clash). With one folder a photo's path is shown as it is in the folder
("dogs/rex.jpg"); with several, under its folder's name ("phone/dogs/rex.jpg"): the index reads
as one tree, and the `folder` filter narrows it the same way in both cases.

A change names the folders the new build holds and the ones read again; the others keep the
rows and vectors the published build has (adding a folder reads only that folder).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def unique_folder_name(path: Path, taken: set[str]) -> str:
    """A folder's name in its index: its own name, numbered where another folder has it ("photos-2")."""
    base = path.name or "folder"
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}-{number}"
    return name


@dataclass(frozen=True)
class FolderNames:
    """The names of an index's folders by id, for showing photo paths."""

    names: dict[int, str]

    def shown(self, folder_id: int, path: str) -> str:
        return path if len(self.names) <= 1 else f"{self.names.get(folder_id, '?')}/{path}"


@dataclass(frozen=True)
class Change:
    """What a build does to the folders: the ones it holds, and those of them it reads again."""

    folders: list[Path]
    rescan: list[Path]

    @classmethod
    def replace(cls, folders: list[Path]) -> "Change":
        """The index becomes these folders, all read again (`crossmodal index A B`)."""
        folders = _unique([f.resolve() for f in folders])
        return cls(folders, folders)

    @classmethod
    def add(cls, current: list[Path], folder: Path) -> "Change":
        folder = folder.resolve()
        return cls(_unique([*current, folder]), [folder])

    @classmethod
    def remove(cls, current: list[Path], folder: Path) -> "Change":
        if folder not in current:
            raise ValueError(f"{folder} is not a folder of this index")
        if len(current) == 1:
            raise ValueError(f"{folder} is the index's only folder: index another folder instead "
                             "(crossmodal index FOLDER)")
        return cls([f for f in current if f != folder], [])

    @classmethod
    def rescan_one(cls, current: list[Path], folder: Path) -> "Change":
        if folder not in current:
            raise ValueError(f"{folder} is not a folder of this index")
        return cls(list(current), [folder])


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def summaries(folders: list[tuple[int, str, str]], counts: tuple[dict, dict]) -> list[dict]:
    """(id, name, path) of folders with their (photos, captions) counts by folder id, as the API lists them."""
    images, captions = counts
    return [{"id": i, "name": name, "path": path, "images": images.get(i, 0), "captions": captions.get(i, 0)}
            for i, name, path in folders]
