"""Reading, checking and writing models: the only module that touches the file system.

Every failure here becomes a one-line `ModelError`/`OutputPathError`. Models over 2 GB cannot
be serialized into one protobuf, so checking and shape inference go through a temporary file
with external data for them, and saving writes external data beside the output.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.checker
import onnx.defs
import onnx.shape_inference
from onnx import external_data_helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo
from google.protobuf.message import DecodeError

from graphopt.errors import ModelError, OutputPathError

# Protobuf refuses to serialize a message of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**24


def is_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too big to serialize as one protobuf.

    ByteSize() itself fails past 2 GB, so weights are measured tensor by tensor; the margin under
    the limit covers the (small) rest of the model.
    """
    return _weight_bytes(model.graph) >= PROTOBUF_LIMIT


def _weight_bytes(graph: onnx.GraphProto) -> int:
    total = sum(_tensor_bytes(t) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                total += _tensor_bytes(attr.t)
            total += sum(_weight_bytes(g) for g in [*([attr.g] if attr.HasField("g") else []), *attr.graphs])
    return total


# Types stored a whole number of bytes per element; packed sub-byte types are measured directly.
_BYTES_PER_ELEMENT = {
    t: onnx.helper.tensor_dtype_to_np_dtype(t).itemsize
    for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
              onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
              onnx.TensorProto.BOOL)
}


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims where possible: reading raw_data copies it."""
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    if tensor.data_type not in _BYTES_PER_ELEMENT:
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * _BYTES_PER_ELEMENT[tensor.data_type]


@dataclass(frozen=True)
class ModelFile:
    """A model as read from disk, and every file it was read from: the model and its external data."""

    path: Path
    model: onnx.ModelProto
    external_data: tuple[Path, ...] = ()

    def inputs(self, role: str = "the input model") -> list[InputFile]:
        """The files this model came from, as inputs that no output may overwrite."""
        return [InputFile(self.path, role, of_model=self.path),
                *(InputFile(data, f"external data of {self.path}", of_model=self.path) for data in self.external_data)]


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and validate a model, or raise a ModelError that says what is wrong with it."""
    return read_model(path).model


def read_model(path: str | os.PathLike) -> ModelFile:
    """Load and validate a model, and note the external-data files its weights were read from.

    This is the one check that reads the weights: onnx.checker reads the file itself, so the
    model is not serialized again for it. Later checks (`check_model`, `check_and_infer`) read
    the graph without its weights.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: file is empty")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as err:
        raise ModelError(f"{path}: not an ONNX model (protobuf parse failed: {_first_line(err)})") from None
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelError(f"{path}: not an ONNX model (no graph or IR version in the protobuf)")
    external_data = _external_data_files(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise ModelError(f"{path}: external data cannot be loaded ({_first_line(err)})") from None
    check_supported_opset(model, path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise ModelError(f"{path}: fails onnx.checker: {_first_line(err)}") from None
    return ModelFile(path, model, external_data)


def _external_data_files(model: onnx.ModelProto, folder: Path) -> tuple[Path, ...]:
    """Files named by the model's external-data tensors (initializers and attributes, subgraphs too)."""
    locations = {
        ExternalDataInfo(tensor).location
        # onnx's own walker over initializers and attribute tensors, the one its loader uses
        for tensor in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(tensor)
    }
    return tuple(folder / location for location in sorted(locations))


def check_supported_opset(model: onnx.ModelProto, where: str | os.PathLike = "model") -> None:
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelError(
                f"{where}: opset {opset.version} is newer than this onnx ({onnx.__version__}) "
                f"supports (up to {newest}); upgrade onnx or export with an older opset"
            )


def check_model(model: onnx.ModelProto, full: bool) -> None:
    """onnx.checker on the graph; `full` adds strict shape inference. Raises ValidationError.

    Weights are checked once, by `load_model`. Passes make new weights with numpy_helper, which
    cannot write a malformed tensor, so this check reads the graph without them (see `graph_only`):
    it costs the same for a 100 MB model as for its graph, and needs no temporary file over 2 GB.
    """
    onnx.checker.check_model(graph_only(model), full_check=full)


def check_and_infer(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """onnx.checker, then shape inference (strict: failures raise), into `model` itself."""
    light = graph_only(model)
    onnx.checker.check_model(light)
    _take_inferred(model, _infer(light, strict))
    return model


def infer_shapes(model: onnx.ModelProto, strict: bool = False, *, in_place: bool = False) -> onnx.ModelProto:
    """`model` (or a copy) with shapes for every tensor onnx can infer (with data propagation)."""
    result = model
    if not in_place:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    _take_inferred(result, _infer(graph_only(model), strict))
    return result


# Inference and the checker read an initializer's dtype and dims, and the values of small integer
# tensors (data propagation through Shape/Gather/Concat arithmetic), never the bytes of weights.
_SHAPE_DTYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
_WEIGHT_MIN_BYTES = 1024


def graph_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without its weights: initializers of 1 KiB or more become graph inputs of the same type.

    Shape inference and onnx.checker serialize their input, so on ResNet-50 each call used to
    copy 100 MB (0.2 s, against 0.01 s for the graph). Integer tensors stay whatever their size:
    shape arithmetic reads their values.
    """
    light = without_initializers(model)
    graph, source = light.graph, model.graph
    listed = {vi.name for vi in source.input}
    for tensor in source.initializer:
        if tensor.data_type in _SHAPE_DTYPES or _tensor_bytes(tensor) < _WEIGHT_MIN_BYTES:
            graph.initializer.append(tensor)
        elif tensor.name not in listed:  # before IR 4 initializers are listed as inputs already
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return light


def _infer(light: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(light, strict_mode=strict, data_prop=True)


def _take_inferred(model: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
    """Put what inference adds or refines into `model`: value_info, outputs, subgraph shapes."""
    for field in ("node", "value_info", "output"):
        del getattr(model.graph, field)[:]
        getattr(model.graph, field).extend(getattr(inferred.graph, field))


# Weights a runtime can take as arrays; other types (bfloat16, float8, packed 4-bit, strings) stay inline.
_ARRAY_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                 onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64}
IN_MEMORY = "(in memory)"


def weights_apart(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph with its weights of 1 KiB or more as external-data references, and those weights.

    A runtime given both (ONNX Runtime's add_external_initializers) runs exactly the model, but
    nothing serializes the weights: on ResNet-50 that was 0.1 s per session, and a model over
    2 GB needs no temporary file.
    """
    light = without_initializers(model)
    weights: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type in _ARRAY_DTYPES and tensor.data_location != onnx.TensorProto.EXTERNAL \
                and _tensor_bytes(tensor) >= _WEIGHT_MIN_BYTES:
            weights[tensor.name] = numpy_helper.to_array(tensor)
            reference = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            reference.data_location = onnx.TensorProto.EXTERNAL
            reference.external_data.add(key="location", value=IN_MEMORY)
        else:
            light.graph.initializer.append(tensor)
    return light, weights


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """What checkers and runtimes read of a model, less the initializers (no weight is copied)."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(source, field))
    return light


def _write(model: onnx.ModelProto, path: str) -> None:
    if is_large(model):
        # Copy first: converting to external data rewrites the initializers in place.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(
            copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data", size_threshold=1024,
        )
    else:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())


# -- writing: every output checked against every input and each other before anything is written --


@dataclass(frozen=True)
class InputFile:
    """A file graphopt reads, which no output may overwrite (unless it is the model and that was asked)."""

    path: Path
    role: str  # what it is, for messages: "the input model", "external data of model.onnx", "--load-inputs"
    of_model: Path | None = None  # the model this file is (or holds weights of)


@dataclass(frozen=True)
class OutputFile:
    """A file graphopt is asked to write, named by a command-line option."""

    path: Path
    option: str  # "-o", "--report", ...: messages name the option, so the user knows which to change
    may_replace: Path | None = None  # the one input it may replace (--in-place, --force)
    is_model: bool = False  # a model over 2 GB is saved with its weights in <name>.data beside it


def check_outputs(outputs: list[OutputFile], inputs: list[InputFile]) -> list[Path]:
    """Refuse, before anything is written, an output that would destroy a file or cannot be written.

    Every output is checked against every input file (models, their external data, loaded
    inputs and outputs, scripts) and against every other output, by identity: the same inode
    (hard links, symbolic links) or, for files still to be created, the same real path. An output
    must be new or a regular file (never a device, FIFO or socket), and writable. An output that
    is a symbolic link stands for its target: the target is replaced atomically and the link
    kept, as `cp` would write through it. Returns the path each output is written to.
    """
    targets = [_output_target(out) for out in outputs]
    written: dict[tuple, str] = {}
    for out, target in zip(outputs, targets):
        # --in-place/--force: -o names the model it may replace, so that model and its weights are replaced as asked
        replaced = out.may_replace if out.may_replace is not None and _file_identity(out.may_replace) == _file_identity(target) else None
        named = [(target, f"{out.option} {out.path}")]
        if out.is_model:
            named.append((target.with_name(target.name + ".data"), f"the external data {target.name}.data that {out.option} {out.path} "
                                                                  "is saved with if it is over 2 GB"))
        for path, what in named:
            identity = _file_identity(path)
            for source in inputs:
                if _file_identity(source.path) != identity:
                    continue
                if replaced is not None and source.of_model is not None and _file_identity(source.of_model) == _file_identity(replaced):
                    continue
                if out.is_model and path is target and source.role == "the input model":
                    raise OutputPathError(f"{out.path}: is the input model; pass --in-place to overwrite it")
                raise OutputPathError(f"{what}: is {source.role}; writing there would destroy it, choose another path")
            if identity in written:
                raise OutputPathError(f"{what} and {written[identity]} name the same file; give each its own path")
            written[identity] = what
    return targets


def _output_target(out: OutputFile) -> Path:
    """Where `out` is written (a symbolic link's target), once it is known to be writable there."""
    path = out.path
    target = path
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise OutputPathError(f"{path}: is a symbolic link to {target}, which does not exist; remove the link or give another path")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"{path}: output directory {parent} does not exist")
    if target.is_dir():
        raise OutputPathError(f"{path}: is a directory; give a file name for {out.option}")
    if target.exists():
        if not stat.S_ISREG(target.stat().st_mode):
            raise OutputPathError(f"{path}: is not a regular file (a device, FIFO or socket); {out.option} writes only regular files")
        if not os.access(target, os.W_OK):
            raise OutputPathError(f"{path}: is read-only; make it writable or give another path for {out.option}")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        with tempfile.TemporaryFile(dir=parent, prefix=f".{target.name}."):
            pass
    except OSError as err:
        raise OutputPathError(f"{path}: output directory {parent} is not writable ({err.strerror or err})") from None
    return target


def _file_identity(path: Path) -> tuple:
    """The same value for two paths to one file: its inode when it exists, else its real path."""
    try:
        info = path.stat()
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))
    return ("inode", info.st_dev, info.st_ino)


def save_model(model: onnx.ModelProto, output: str | os.PathLike) -> None:
    """Write atomically: everything goes to a temporary folder beside the output, then is renamed.

    A crash, a full disk or a signal leaves the previous file (or none) in place, never a
    half-written one, and no temporary folder.
    """
    _write_atomically(Path(output), lambda staged: _write(model, staged))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """A text file (report, JSON) written as models are: atomically, with the same permissions."""

    def write(staged: str) -> None:
        with open(staged, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _write_atomically(Path(path), write)


def _write_atomically(output: Path, write: Callable[[str], None]) -> None:
    """`write(staged_path)` into a temporary folder beside `output`, then rename what it wrote.

    Files are created by `open`, so they get the permissions the umask gives a new file; a file
    that is replaced keeps its own permission bits.
    """
    parent = output.parent if str(output.parent) else Path(".")
    try:
        mode = stat.S_IMODE(output.stat().st_mode) if output.is_file() else None
        with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=parent) as tmp:
            staged = os.path.join(tmp, output.name)
            write(staged)
            if mode is not None:
                os.chmod(staged, mode)
            # External data (large models) is renamed first, so the model never points at nothing.
            for name in sorted(os.listdir(tmp), key=lambda n: n == output.name):
                os.replace(os.path.join(tmp, name), parent / name)
    except OSError as err:
        raise OutputPathError(f"{output}: cannot write ({err.strerror or err})") from None


def _first_line(err: BaseException) -> str:
    """An exception's message folded onto one line, shortened: errors print one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
