"""The output-path planner: every command checks all the paths it will write before it does
any work, so that a run never fails after an hour of calibration on a folder it cannot write,
and never overwrites one of its own inputs.

A file output must not be a folder or a special file, its folder must accept a new file
(tried for real; a missing folder is created when the output is written, if its nearest
existing ancestor is a writable folder), it must not be any input (the prototxt, the weights, every data file
the net reads: image lists, images, mean files, LMDBs, label maps...), and no two outputs may
be the same file. A folder output (``--report``, ``--dump``) may be created the same way;
what it will write there must not be an input either.

Stale temporary files a killed run left beside the outputs are removed on the way
(:func:`calibrator.fileio.remove_stale_temporaries`)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from calibrator.errors import CalibratorError, shorten
from calibrator.fileio import remove_stale_temporaries, writable_folder


def _real(path: Path) -> str:
    """The absolute, symlink-free spelling of ``path`` (which need not exist)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.abspath(path)


def _lstat(path: Path, label: str):
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        raise CalibratorError(f"{label} {shorten(path)}: the path contains a NUL character") \
            from None
    except OSError as exc:
        raise CalibratorError(f"{label} {shorten(path)}: {exc.strerror or exc}") from None


@dataclass
class FolderOutput:
    """A folder a command writes files into; ``writes(name)`` says whether a file of that
    name is one of them (None: any file in it may be)."""

    label: str
    path: Path
    writes: Callable[[str], bool] | None = None


@dataclass
class OutputPlan:
    """The outputs of one command: ``files`` by label (``--output``, ``--json``...), and
    folders. :meth:`check` (structure and the command-line inputs) before anything is read,
    :meth:`check_inputs` again once the data files are known."""

    files: dict[str, Path] = field(default_factory=dict)
    folders: list[FolderOutput] = field(default_factory=list)

    def file(self, label: str, path) -> Path:
        path = Path(path)
        self.files[label] = path
        return path

    def folder(self, label: str, path, writes: Callable[[str], bool] | None = None) -> Path:
        path = Path(path)
        self.folders.append(FolderOutput(label, path, writes))
        return path

    # -- checks ------------------------------------------------------------------------------
    def check(self, inputs: Iterable = ()) -> "OutputPlan":
        """Every output writable, none a folder (or a file, for folders), no two the same,
        none of ``inputs``; stale temporary files removed."""
        seen: dict[str, str] = {}
        for label, path in self.files.items():
            _check_file(label, path)
            real = _real(path)
            if real in seen:
                raise CalibratorError(f"{label} {shorten(path)}: {seen[real]} writes the same "
                                      "file; give each output its own path")
            seen[real] = label
        for output in self.folders:
            _check_folder(output)
        for output in self.folders:
            real = _real(output.path)
            for file_real, label in seen.items():
                if file_real == real:
                    raise CalibratorError(f"{output.label} {shorten(output.path)}: {label} "
                                          "writes a file there; give each output its own path")
                if os.path.dirname(file_real) == real and \
                        _writes(output, os.path.basename(file_real)):
                    raise CalibratorError(f"{label} {shorten(self.files[label])}: "
                                          f"{output.label} writes a file of that name")
        self.check_inputs(inputs)
        for path in [*self.files.values(), *(o.path for o in self.folders)]:
            remove_stale_temporaries(path)
        return self

    def check_inputs(self, inputs: Iterable) -> None:
        """No output is, or replaces the file behind, one of ``inputs`` (compared by
        identity, so links either way and hard links count). Only outputs that exist can
        be inputs: a fresh run skips the comparison."""
        outputs = {}
        for label, path in self.files.items():
            ident = _identity(path)
            if ident is not None:
                outputs[ident] = label
        folders = {_real(o.path): o for o in self.folders if os.path.isdir(o.path)}
        if not outputs and not folders:
            return
        for item in inputs:
            if item is None:
                continue
            path = Path(item)
            label = outputs.get(_identity(path)) if outputs else None
            if label is None and folders:
                output = None
                if any(o.writes is None or _writes(o, path.name) for o in folders.values()):
                    real = _real(path)
                    output = folders.get(os.path.dirname(real))
                    if output is not None and not _writes(output, os.path.basename(real)):
                        output = None
                label = output.label if output is not None else None
            if label is not None:
                raise CalibratorError(f"{label} {shorten(self._path_of(label))}: would "
                                      f"overwrite an input ({shorten(path)})")

    def _path_of(self, label: str) -> Path:
        if label in self.files:
            return self.files[label]
        return next(o.path for o in self.folders if o.label == label)


def _identity(path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino)


def _writes(output: FolderOutput, name: str) -> bool:
    return True if output.writes is None else bool(output.writes(name))


def _check_file(label: str, path: Path) -> None:
    info = _lstat(path, label)
    if info is not None and stat.S_ISLNK(info.st_mode):
        try:
            info = os.stat(path)
        except OSError:
            info = None  # a dangling link: replaced by the file
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise CalibratorError(f"{label} {shorten(path)}: is a folder, expected a file "
                                  "name")
        if not stat.S_ISREG(info.st_mode):
            raise CalibratorError(f"{label} {shorten(path)}: is not a regular file (a "
                                  "device, FIFO or socket); refusing to replace it")
    _creatable_in(label, path)


def _creatable_in(label: str, path: Path) -> None:
    """``path``'s folder accepts a new entry: it exists and is writable, or it is missing
    and its nearest existing ancestor is a writable folder (the missing folders are created
    when the output is written, not before: a run that fails leaves nothing behind)."""
    parent = Path(os.path.abspath(path)).parent
    while _lstat(parent, label) is None and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent):
        raise CalibratorError(f"{label} {shorten(path)}: {shorten(parent)} is not a folder")
    writable_folder(parent, f"{label} {shorten(path.name)}")


def _check_folder(output: FolderOutput) -> None:
    path = output.path
    info = _lstat(path, output.label)
    if info is not None and os.path.exists(path):
        if not os.path.isdir(path):
            raise CalibratorError(f"{output.label} {shorten(path)}: is not a folder (a file "
                                  "of that name exists)")
        writable_folder(path, f"{output.label} files")
        return
    _creatable_in(output.label, path)


def check_replaced_folder(label: str, folder, inputs: Iterable) -> None:
    """A folder an output replaces as a whole (``make-annoset --force``) must hold no input,
    at any depth."""
    root = _real(Path(folder))
    for item in inputs:
        if item is None:
            continue
        real = _real(Path(item))
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            raise CalibratorError(f"{label} {shorten(folder)}: would replace a folder "
                                  f"holding an input ({shorten(item)})")


def option_inputs(detection_list) -> list:
    """The files a ``--det-list`` run names on the command line."""
    if detection_list is None:
        return []
    return [detection_list.list_path, detection_list.labelmap, detection_list.name_size]


def data_inputs(model) -> list[Path]:
    """Every file a loaded model reads: prototxt, weights, the data source's files (image
    list and images, LMDB, mean file, label map...), DetectionEvaluate's name/size file."""
    files = [model.prototxt, model.weights_path]
    if model.source is not None:
        files.extend(model.source.input_files())
    for layer in model.test_param.layer:
        if layer.type == "DetectionEvaluate" and layer.detection_evaluate_param.name_size_file:
            files.append(Path(layer.detection_evaluate_param.name_size_file))
    return [Path(f) for f in files if f is not None]
