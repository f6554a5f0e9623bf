"""Export a network or a fitted estimator to ONNX, to run it without bnrs.

Needs the ``onnx`` package (``pip install "bnrs[onnx]"``); bnrs itself never does. The
file is an *inference* graph: the evaluation-mode forward, batch norm with its running
statistics, dropout left out. Run it with ONNX Runtime (``pip install onnxruntime``) or
any ONNX back end::

    import onnxruntime as ort
    session = ort.InferenceSession("model.onnx")
    logits, probabilities = session.run(None, {"input": X.astype(np.float32)})

The graph
---------
One input, ``input``: float32 of shape (N, C, H, W) (channels first, as the network takes
it) or (N, n_features), N dynamic. A fitted estimator's input has its network's shape,
``(N, *input_shape_)``: X seen channels last (``data_format_ == "channels_last"``) must be
transposed to channels first, flat rows reshaped, as the estimator does before its
network.

Outputs: for a network, ``output``, what its ``forward`` returns in evaluation mode. For a
:class:`~bnrs.CNNClassifier`, ``logits`` (the network's output) and ``probabilities``
(their softmax, what ``predict_proba`` gives, up to float32 rounding: ``predict_proba``
returns float64); the labels are not in the graph but in its metadata, ``classes``
(JSON), in the columns' order: ``predict`` is ``classes[argmax(logits)]``. For a
:class:`~bnrs.CNNRegressor`, ``predictions`` of shape (N, n_outputs_), also when ``y`` was
1-D in ``fit`` (``predict`` then returns it raveled).

The layers as ONNX operators (default opset 17; ``opset`` may be 17 to 21):

======================================  ==============================================
Conv2d                                  Conv (``group`` = ``groups``)
Linear                                  Gemm (MatMul and Add for inputs of more than
                                        two axes)
BatchNorm1d/2d, BatchRenorm1d/2d        BatchNormalization (inference, with the
                                        running statistics)
GroupNorm                               below opset 21, Reshape to (N, groups, -1),
                                        LayerNormalization, Reshape back, Mul, Add;
                                        from 21, GroupNormalization (see below)
LayerNorm                               LayerNormalization
InstanceNorm2d                          InstanceNormalization (scale 1, bias 0 without
                                        affine)
MaxPool2d, AvgPool2d                    MaxPool, AveragePool (with
                                        ``count_include_pad``)
ReLU, LeakyReLU, Sigmoid, Tanh          Relu, LeakyRelu, Sigmoid, Tanh
Flatten                                 Flatten (Reshape unless it flattens all but
                                        the batch axis)
Dropout, Dropout2d                      nothing: the identity in evaluation mode
AdaptiveAvgPool2d (output size 1)       GlobalAveragePool
Concat                                  each branch's nodes, all reading the block's
                                        input, then Concat (axis 1)
Residual                                the body's nodes and the shortcut's (none for
                                        the identity), both reading the block's input,
                                        Add, then the activation's nodes
======================================  ==============================================

Containers are followed recursively: a nested Sequential, a branch or a residual path is
emitted as any network is, so the branching tokens of the architecture grammar (``gap``,
``inc...``, ``res...``, with ``_nobn``/``_postbn``) export through :func:`bnrs.nn.from_spec`
models and fitted estimators alike. Node and initializer names are the layers' state-dict
prefixes (``1.branches.2.0.weight``, ``2.body.0``).

GroupNormalization with the layer's per-channel scale and bias is opset 21's (opset 18's
has them per group, which cannot express the layer). ONNX Runtime 1.32's GroupNormalization
loses precision when a group's mean is large against its spread, as a variance computed
as E[x^2] - E[x]^2 would: group norm with scale (1, 2, 3, 4) of inputs of spread 1
offset by 100 was off by 1.9e-2 from a float64 reference, where the opset-17 graph (and
bnrs) were within 8.4e-6 (ONNX Runtime's LayerNormalization is accurate). The default
opset, 17, therefore gives the more accurate file; ask for 21 where one
GroupNormalization node matters more.

Batch norm without running statistics (``track_running_stats=False``) normalises with the
statistics of the batch at inference too, which no ONNX inference operator does: it is
refused with a ``NotImplementedError``, as is any layer not in the table.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from . import __version__, nn
from .nn.summary import layers_in_order

__all__ = ["DEFAULT_OPSET", "export"]

#: LayerNormalization is in the default domain from opset 17.
DEFAULT_OPSET = 17
_MIN_OPSET = 17
#: GroupNormalization with per-channel scale and bias (the layer's parameters).
_GROUP_NORM_OPSET = 21
#: The newest opset whose operators used here have been checked.
_MAX_OPSET = 21


def _import_onnx():
    try:
        import onnx
    except ImportError as error:
        raise ImportError("bnrs.onnx.export needs the onnx package: "
                          'pip install "bnrs[onnx]" (or pip install onnx)') from error
    return onnx


class _Graph:
    """The nodes and initializers of the graph being built, with unique names."""

    def __init__(self, onnx, opset: int, reserved_names):
        self.onnx, self.opset = onnx, opset
        self.nodes, self.initializers = [], []
        self._names: set[str] = set(reserved_names)

    def _unique(self, name: str) -> str:
        candidate, suffix = name, 1
        while candidate in self._names:
            suffix += 1
            candidate = f"{name}_{suffix}"
        self._names.add(candidate)
        return candidate

    def constant(self, name: str, value, dtype=np.float32) -> str:
        """Add ``value`` as an initializer; returns its name."""
        name = self._unique(name)
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op_type: str, inputs: list[str], name: str, **attributes) -> str:
        """Add one node with a single output; returns the output's name."""
        output = self._unique(name)
        self.nodes.append(self.onnx.helper.make_node(
            op_type, inputs, [output], name=self._unique(f"{name}/{op_type}"), **attributes))
        return output


def _float32(value) -> float:
    """A float attribute as ONNX stores it (float32)."""
    return float(np.float32(value))


def _pads(padding: tuple[int, int]) -> list[int]:
    """ONNX's pads, the begin of each spatial axis then the end."""
    return [padding[0], padding[1], padding[0], padding[1]]


def _conv(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    inputs = [x, graph.constant(f"{name}.weight", layer.weight.data)]
    if layer.bias is not None:
        inputs.append(graph.constant(f"{name}.bias", layer.bias.data))
    return graph.node("Conv", inputs, name, kernel_shape=list(layer.kernel_size),
                      strides=list(layer.stride), pads=_pads(layer.padding),
                      dilations=list(layer.dilation), group=layer.groups)


def _linear(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    if len(input_shape) == 1:
        inputs = [x, graph.constant(f"{name}.weight", layer.weight.data)]
        if layer.bias is not None:
            inputs.append(graph.constant(f"{name}.bias", layer.bias.data))
        return graph.node("Gemm", inputs, name, transB=1)
    # Gemm takes 2-D input only: (*, in) @ weight.T, plus the bias.
    weight_t = graph.constant(f"{name}.weight_t", layer.weight.data.T)
    product = graph.node("MatMul", [x, weight_t],
                         f"{name}.matmul" if layer.bias is not None else name)
    if layer.bias is None:
        return product
    return graph.node("Add", [product, graph.constant(f"{name}.bias", layer.bias.data)], name)


def _affine_or(layer, shape) -> tuple[np.ndarray, np.ndarray]:
    """The layer's weight and bias, or the identity's ones and zeros without them."""
    weight = np.ones(shape, np.float32) if layer.weight is None else layer.weight.data
    bias = np.zeros(shape, np.float32) if layer.bias is None else layer.bias.data
    return weight, bias


def _batch_norm(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    if not layer.track_running_stats:
        raise NotImplementedError(
            f"{name} ({layer!r}): batch norm without running statistics normalises with "
            "the statistics of each batch even at inference; no ONNX inference operator "
            "does that")
    weight, bias = _affine_or(layer, (layer.num_features,))
    inputs = [x, graph.constant(f"{name}.weight", weight),
              graph.constant(f"{name}.bias", bias),
              graph.constant(f"{name}.running_mean", layer.running_mean),
              graph.constant(f"{name}.running_var", layer.running_var)]
    return graph.node("BatchNormalization", inputs, name, epsilon=_float32(layer.eps))


def _instance_norm(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    weight, bias = _affine_or(layer, (layer.num_features,))
    return graph.node("InstanceNormalization",
                      [x, graph.constant(f"{name}.weight", weight),
                       graph.constant(f"{name}.bias", bias)],
                      name, epsilon=_float32(layer.eps))


def _layer_norm(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    weight, bias = _affine_or(layer, layer.normalized_shape)
    return graph.node("LayerNormalization",
                      [x, graph.constant(f"{name}.weight", weight),
                       graph.constant(f"{name}.bias", bias)],
                      name, axis=-len(layer.normalized_shape), epsilon=_float32(layer.eps))


def _group_norm(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    channels = layer.num_channels
    weight, bias = _affine_or(layer, (channels,))
    if graph.opset >= _GROUP_NORM_OPSET:
        return graph.node("GroupNormalization",
                          [x, graph.constant(f"{name}.weight", weight),
                           graph.constant(f"{name}.bias", bias)],
                          name, num_groups=layer.num_groups, epsilon=_float32(layer.eps))
    # Each (sample, group) normalised over its values is layer norm of (N, groups, -1);
    # the per-channel affine follows on the original shape.
    groups = layer.num_groups
    grouped = graph.node("Reshape", [x, graph.constant(f"{name}.grouped_shape",
                                                       [0, groups, -1], np.int64)],
                         f"{name}.grouped")
    group_size = math.prod(input_shape) // groups
    normalised = graph.node(
        "LayerNormalization", [grouped, graph.constant(f"{name}.ones", np.ones(group_size))],
        f"{name}.normalised", axis=-1, epsilon=_float32(layer.eps))
    restored = graph.node("Reshape", [normalised, graph.constant(
        f"{name}.shape", [0, *input_shape], np.int64)], f"{name}.restored")
    if layer.weight is None:
        return restored
    per_channel = (channels,) + (1,) * (len(input_shape) - 1)
    scaled = graph.node("Mul", [restored, graph.constant(
        f"{name}.weight", weight.reshape(per_channel))], f"{name}.scaled")
    return graph.node("Add", [scaled, graph.constant(
        f"{name}.bias", bias.reshape(per_channel))], name)


def _max_pool(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    return graph.node("MaxPool", [x], name, kernel_shape=list(layer.kernel_size),
                      strides=list(layer.stride), pads=_pads(layer.padding))


def _avg_pool(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    return graph.node("AveragePool", [x], name, kernel_shape=list(layer.kernel_size),
                      strides=list(layer.stride), pads=_pads(layer.padding),
                      count_include_pad=int(layer.count_include_pad))


def _flatten(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    ndim = len(input_shape) + 1
    start = layer.start_dim + ndim if layer.start_dim < 0 else layer.start_dim
    end = layer.end_dim + ndim if layer.end_dim < 0 else layer.end_dim
    if start == 0:
        raise NotImplementedError(f"{name} ({layer!r}): flattening the batch axis is not "
                                  "exported (the batch size is dynamic)")
    if start == 1 and end == ndim - 1:
        # ONNX's Flatten always gives 2-D output, the axes before ``axis`` merged too.
        return graph.node("Flatten", [x], name, axis=1)
    shape = graph.constant(f"{name}.shape", [0, *output_shape], np.int64)
    return graph.node("Reshape", [x, shape], name)


def _leaky_relu(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    return graph.node("LeakyRelu", [x], name, alpha=_float32(layer.negative_slope))


def _element_wise(op_type: str):
    def convert(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
        return graph.node(op_type, [x], name)
    return convert


def _identity(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    return x


def _global_avg_pool(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    return graph.node("GlobalAveragePool", [x], name)


def _concat(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    # Every branch reads the same tensor, as the layer gives each branch the same array.
    outputs = [_emit(graph, branch, x, input_shape, f"{name}.branches.{index}")[0]
               for index, branch in enumerate(layer.branches)]
    return graph.node("Concat", outputs, name, axis=1)


def _residual(graph: _Graph, layer, name, x, input_shape, output_shape) -> str:
    body, shape = _emit(graph, layer.body, x, input_shape, f"{name}.body")
    skip = x if layer.shortcut is None else _emit(graph, layer.shortcut, x, input_shape,
                                                  f"{name}.shortcut")[0]
    if layer.activation is None:
        return graph.node("Add", [body, skip], name)
    total = graph.node("Add", [body, skip], f"{name}.add")
    return _emit(graph, layer.activation, total, shape, f"{name}.activation")[0]


#: Layer class -> converter; the first class the layer is an instance of is used.
_CONVERTERS = (
    (nn.Conv2d, _conv),
    (nn.Linear, _linear),
    (nn.BatchNorm1d, _batch_norm),   # and BatchRenorm1d: the same evaluation forward
    (nn.BatchNorm2d, _batch_norm),
    (nn.GroupNorm, _group_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.InstanceNorm2d, _instance_norm),
    (nn.MaxPool2d, _max_pool),
    (nn.AvgPool2d, _avg_pool),
    (nn.Flatten, _flatten),
    (nn.ReLU, _element_wise("Relu")),
    (nn.LeakyReLU, _leaky_relu),
    (nn.Sigmoid, _element_wise("Sigmoid")),
    (nn.Tanh, _element_wise("Tanh")),
    (nn.Dropout, _identity),
    (nn.Dropout2d, _identity),
    (nn.AdaptiveAvgPool2d, _global_avg_pool),
    (nn.Concat, _concat),
    (nn.Residual, _residual),
)


def _converter(layer, name: str):
    for layer_class, convert in _CONVERTERS:
        if isinstance(layer, layer_class):
            return convert
    raise NotImplementedError(f"{name}: {type(layer).__name__} has no ONNX export")


def _emit(graph: _Graph, module, x: str, input_shape: tuple[int, ...],
          prefix: str = "") -> tuple[str, tuple[int, ...]]:
    """Add the nodes of ``module`` (a layer or a Sequential, nested ones followed) reading
    the tensor ``x`` of sample shape ``input_shape``; returns its output's name and sample
    shape. Concat and Residual come back here for their branches."""
    shape = tuple(input_shape)
    for name, layer in layers_in_order(module, prefix):
        output_shape = tuple(layer.output_shape(shape))
        x = _converter(layer, name)(graph, layer, name, x, shape, output_shape)
        shape = output_shape
    return x, shape


def _sample_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if not shape or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                            and d >= 1 for d in shape):
        raise ValueError(f"input_shape: expected one sample's shape as positive ints, e.g. "
                         f"(C, H, W) or (n_features,), got {input_shape!r}")
    return tuple(int(d) for d in shape)


def _source(model_or_estimator, input_shape):
    """(network, sample shape, kind of graph, metadata) of what is exported."""
    if isinstance(model_or_estimator, nn.Module):
        if input_shape is None:
            raise TypeError("input_shape: required to export a network, e.g. (1, 28, 28) "
                            "or (n_features,)")
        return model_or_estimator, input_shape, "network", {}
    from sklearn.utils.validation import check_is_fitted

    from .estimator import CNNClassifier, CNNRegressor

    if not isinstance(model_or_estimator, (CNNClassifier, CNNRegressor)):
        raise TypeError("model_or_estimator: expected a bnrs.nn.Module, a CNNClassifier "
                        f"or a CNNRegressor, got {type(model_or_estimator).__name__}")
    estimator = model_or_estimator
    check_is_fitted(estimator)
    fitted_shape = tuple(estimator.input_shape_)
    if input_shape is not None and tuple(input_shape) != fitted_shape:
        raise ValueError(f"input_shape: the estimator was fitted on samples of shape "
                         f"{fitted_shape}, got {tuple(input_shape)}")
    metadata = {"architecture": estimator.architecture,
                "data_format": estimator.data_format_}
    if isinstance(estimator, CNNClassifier):
        metadata["classes"] = json.dumps(np.asarray(estimator.classes_).tolist())
        return estimator.model_, fitted_shape, "classifier", metadata
    return estimator.model_, fitted_shape, "regressor", metadata


def export(model_or_estimator, path: str | os.PathLike | None,
           input_shape=None, *, opset: int = DEFAULT_OPSET):
    """Write the inference graph of a network or a fitted estimator as an ONNX file.

    Parameters
    ----------
    model_or_estimator : bnrs.nn.Sequential, bnrs.nn.Module, CNNClassifier or CNNRegressor
        A network (exported as in evaluation mode, whatever its mode; it is not
        changed) or a fitted estimator (its ``model_``).
    path : str, os.PathLike or None
        Where to write the file; None writes nothing (the model is returned).
    input_shape : tuple of int, optional
        One sample's shape, (C, H, W) or (n_features,): required for a network; for an
        estimator it defaults to (and must equal) ``input_shape_``.
    opset : int, default 17
        The ONNX opset, 17 to 21; from 21 GroupNorm is one GroupNormalization node.

    Returns
    -------
    onnx.ModelProto
        The model written, checked with ``onnx.checker.check_model``.

    Raises
    ------
    ImportError
        Without the ``onnx`` package.
    NotImplementedError
        For a layer with no inference operator (see the module docstring).

    Examples
    --------
    >>> from bnrs import nn, onnx as bnrs_onnx                      # doctest: +SKIP
    >>> model = nn.from_spec("c8-bn-relu-mp2", (1, 8, 8), 10)       # doctest: +SKIP
    >>> bnrs_onnx.export(model, "model.onnx", input_shape=(1, 8, 8))  # doctest: +SKIP
    """
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not (
            _MIN_OPSET <= opset <= _MAX_OPSET):
        raise ValueError(f"opset: expected an int from {_MIN_OPSET} to {_MAX_OPSET}, "
                         f"got {opset!r}")
    onnx = _import_onnx()
    model, input_shape, kind, metadata = _source(model_or_estimator, input_shape)
    sample_shape = _sample_shape(input_shape)
    output_names = {"network": ["output"], "classifier": ["logits", "probabilities"],
                    "regressor": ["predictions"]}[kind]
    graph = _Graph(onnx, int(opset), reserved_names=["input", *output_names])
    x, shape = _emit(graph, model, "input", sample_shape)

    def value_info(value_name: str, dims: tuple[int, ...]):
        return onnx.helper.make_tensor_value_info(value_name, onnx.TensorProto.FLOAT,
                                                  ["N", *dims])

    # The last layer's output gets its public name through an Identity (it may be the
    # input itself, for a network of dropout only).
    graph.nodes.append(onnx.helper.make_node("Identity", [x], [output_names[0]],
                                             name=f"{output_names[0]}/Identity"))
    if kind == "classifier":
        graph.nodes.append(onnx.helper.make_node("Softmax", [output_names[0]],
                                                 [output_names[1]], axis=-1,
                                                 name="probabilities/Softmax"))
    onnx_graph = onnx.helper.make_graph(
        graph.nodes, "bnrs", [value_info("input", sample_shape)],
        [value_info(output, shape) for output in output_names], graph.initializers,
        doc_string="Inference graph exported by bnrs.onnx.export (evaluation mode)")
    opset_ids = [onnx.helper.make_opsetid("", int(opset))]
    # The oldest IR version that has the opset, not the onnx package's newest: older
    # runtimes refuse a file of a newer IR version even if they know every operator.
    onnx_model = onnx.helper.make_model(
        onnx_graph, opset_imports=opset_ids, producer_name="bnrs",
        producer_version=__version__,
        ir_version=onnx.helper.find_min_ir_version_for(opset_ids))
    onnx.helper.set_model_props(onnx_model, metadata)
    onnx.checker.check_model(onnx_model, full_check=True)
    if path is not None:
        onnx.save(onnx_model, os.fspath(path))
    return onnx_model
