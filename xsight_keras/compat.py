"""Every use of Keras internals in the package, each behind one small named function.

The package relies on a few behaviours of Keras that are not public API: private attributes,
private methods that it overrides or wraps, and one ``keras.src`` import. They are all here, and
only here, each with a docstring naming the behaviour of Keras 3.15 (the version range pinned
in ``pyproject.toml``) it relies on. ``tests/test_compat.py`` checks each behaviour and fails
with a message naming it, and greps the package so that no other module uses ``keras.src`` or
a private Keras attribute. To move to a new Keras release: run that test file first.

Bottom layer: imports Keras (and PyTorch, lazily, on the torch backend) and nothing of the
package.
"""

from __future__ import annotations

import keras

try:
    from keras.src.backend.common.stateless_scope import in_stateless_scope as _in_stateless_scope
except ImportError:  # pragma: no cover - a newer Keras moved it; callers take Keras' own path
    _in_stateless_scope = None


# layers and variables -----------------------------------------------------------------------


def in_stateless_scope() -> bool:
    """Whether the code runs inside a ``keras.StatelessScope``.

    Relies on: ``keras.src.backend.common.stateless_scope.in_stateless_scope()``, and on Keras'
    torch backend running shape inference (``compute_output_spec``, on "meta" tensors) and
    ``stateless_call`` inside such a scope. Returns True (the caller then runs Keras' own code)
    when that function no longer exists.
    """
    return True if _in_stateless_scope is None else bool(_in_stateless_scope())


def all_layers(model: keras.layers.Layer, include_self: bool = True) -> list:
    """``model`` (with ``include_self``) and every layer nested in it at any depth, each once.

    Relies on: ``Layer._flatten_layers(include_self, recursive=True)``.
    """
    return list(model._flatten_layers(include_self=include_self))


def conv_kernel(layer: keras.layers.Layer):
    """The kernel variable of a built Keras convolution layer (``Conv1D/2D/3D`` and subclasses).

    Relies on: the convolution base class keeping the variable as ``layer._kernel`` (its public
    ``kernel`` property may return a LoRA-adjusted tensor instead of the variable).
    """
    return layer._kernel


def torch_tensor(variable):
    """The PyTorch tensor stored behind a ``keras.Variable`` on the torch backend, or None
    (another backend, a variable not yet initialised).

    Relies on: the torch backend's ``Variable`` keeping its ``torch.nn.Parameter`` as
    ``variable._value``; unlike ``variable.value`` this reads it without autocasting and
    outside any stateless scope.
    """
    return getattr(variable, "_value", None)


def replace_torch_tensor(variable, tensor) -> None:
    """Make the torch ``tensor`` (same shape and dtype; any strides) the storage of ``variable``.

    Relies on: the torch backend's ``Variable`` reading ``variable._value`` in ``value`` and
    writing it in place in ``assign`` (``copy_``), so the new tensor's memory layout is kept by
    every later read, assignment and gradient. The trainable flag is carried over.
    """
    import torch

    old = variable._value
    variable._value = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)


def variable_version(variable) -> tuple[int, int]:
    """``(id, in-place version)`` of the torch tensor behind ``variable``: the version grows by
    exactly one per ``assign`` / ``assign_add`` / ``assign_sub``, and the id stays.

    Relies on: the torch backend's ``Variable`` assigning in place into ``variable._value``
    (``_direct_assign`` → ``copy_``), never replacing the tensor. (The version counter itself
    is PyTorch's ``Tensor._version``.)
    """
    value = variable._value
    return id(value), value._version


def current_autocast_scope():
    """The innermost autocast scope in force (its ``.dtype``: the dtype variables read inside
    it are cast to, or None when it switches casting off), or None outside any.

    Relies on: ``keras.src.backend.get_autocast_scope()``, and ``Layer.__call__`` opening an
    ``AutocastScope`` around ``call`` when the layer's compute dtype differs from its
    variables' dtype (or from the scope it was called in).
    """
    from keras.src.backend import get_autocast_scope

    return get_autocast_scope()


def autocast_scope(dtype: str | None):
    """A context manager in which variables (those created with ``autocast=True``) read as
    ``dtype``; ``None`` switches casting off.

    Relies on: ``keras.src.backend.AutocastScope(dtype)``, what ``Layer.__call__`` opens.
    """
    from keras.src.backend import AutocastScope

    return AutocastScope(dtype)


def graph_nodes(model: keras.Model) -> list:
    """The calls of a Functional model in the order Keras runs them: a list of
    ``(operation, args, kwargs, outputs)`` per node, ``args`` / ``kwargs`` holding the model's
    ``KerasTensor``s where tensors go, ``outputs`` the ``KerasTensor``s the node produces.
    Input nodes are left out.

    Relies on: ``Functional._nodes_by_depth`` ({depth: [Node]}, run from the deepest depth
    down) and each ``Node``'s ``operation``, ``is_input``, ``arguments.args``,
    ``arguments.kwargs`` and ``outputs``, as ``Function._run_through_graph`` reads them.
    """
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            nodes.append((node.operation, tuple(node.arguments.args),
                          dict(node.arguments.kwargs), list(node.outputs)))
    return nodes


# optimizers ---------------------------------------------------------------------------------


def optimizer_slot_prefix(variable) -> str:
    """The prefix of the names of the optimizer slots (moments, momentum…) of ``variable``.

    Relies on: Keras naming each slot ``{variable.path with "/" → "_"}_{slot}``
    (``Optimizer.add_variable_from_reference``).
    """
    return variable.path.replace("/", "_") + "_"


def adam_slots(optimizer, variable) -> tuple:
    """``(first moment, second moment)`` variables of ``Adam``/``AdamW`` for ``variable``.

    Relies on: ``Adam`` keeping them in ``_momentums`` and ``_velocities``, indexed by
    ``optimizer._get_variable_index(variable)``.
    """
    index = optimizer._get_variable_index(variable)
    return optimizer._momentums[index], optimizer._velocities[index]


def uses_weight_decay(optimizer, variable) -> bool:
    """Whether ``optimizer`` decays ``variable`` (its ``exclude_from_weight_decay`` settings).

    Relies on: ``Optimizer._use_weight_decay(variable)``.
    """
    return bool(optimizer._use_weight_decay(variable))


class UpdateStepOverride:
    """Mixin for a Keras optimizer class (put it first among the bases) that replaces the whole
    update of one step (decoupled weight decay and every variable's update) by one call.

    A subclass defines ``replaces_update_step()`` (whether to replace Keras' code this step;
    False: Keras' own code runs) and ``update_all_variables(grads, variables, learning_rate)``,
    which must also apply the weight decay. Everything else of ``apply`` (gradient filtering,
    loss-scale unscaling, clipping, accumulation, EMA, constraints, the step counter) stays
    Keras'.

    Relies on: ``Optimizer.apply`` calling ``self._apply_weight_decay(variables)`` and then
    ``self._backend_update_step(grads, variables, self.learning_rate)`` once per update step
    (after clipping), both overridable on the subclass.
    """

    def replaces_update_step(self) -> bool:
        return False

    def update_all_variables(self, grads, variables, learning_rate) -> None:
        raise NotImplementedError

    def _apply_weight_decay(self, variables):
        if not self.replaces_update_step():
            super()._apply_weight_decay(variables)
        # else: update_all_variables decays each variable itself

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self.replaces_update_step():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        return self.update_all_variables(grads, trainable_variables, learning_rate)


class LossScaleApplyOverride:
    """Mixin for a subclass of ``keras.optimizers.LossScaleOptimizer`` (put it first among the
    bases) that decides a step itself: ``apply_scaled(grads, variables)`` returns True when it
    did the whole step (finite check, unscaling, the inner optimizer's update, the loss scale
    and its counter), False to let Keras' own code run.

    Relies on: ``LossScaleOptimizer.apply`` building the optimizer, then (on backends other
    than TensorFlow) calling ``self._common_apply(grads, trainable_variables)`` once per step,
    which Keras implements as ``check_finite`` and an ``ops.cond`` between applying the
    unscaled gradients with the inner optimizer and halving ``dynamic_scale``.
    """

    def apply_scaled(self, grads, trainable_variables) -> bool:
        return False

    def _common_apply(self, grads, trainable_variables=None):
        if not self.apply_scaled(grads, trainable_variables):
            super()._common_apply(grads, trainable_variables)


def wrap_optimizer_apply(optimizer, wrapper) -> None:
    """Replace ``optimizer.apply`` on this instance by ``wrapper(original_apply)``.

    Relies on: Keras' torch trainer calling ``self.optimizer.apply(gradients, variables)``
    exactly once per training step, looked up on the instance (so an instance attribute wins
    over the class method). Under ``mixed_float16`` the model's optimizer is the
    ``LossScaleOptimizer`` and its ``apply`` is the one wrapped.
    """
    optimizer.apply = wrapper(optimizer.apply)


# models and callbacks -----------------------------------------------------------------------


def wrap_epoch_metrics(model: keras.Model, wrapper) -> None:
    """Replace the model's end-of-epoch metric read-out by ``wrapper(original)``, a function of
    the step's ``logs`` that returns the logged values.

    Relies on: Keras' torch trainer calling ``model._get_metrics_result_or_logs(logs)`` when an
    epoch of ``fit`` (and a run of ``evaluate``) ends, to turn the metrics' accumulated state
    into the logged values, looked up on the instance.
    """
    model._get_metrics_result_or_logs = wrapper(model._get_metrics_result_or_logs)


EARLY_STOPPING_STATE = ("wait", "best", "best_epoch", "best_weights")


def early_stopping_state(callback: keras.callbacks.EarlyStopping) -> dict:
    """``{"wait", "best", "best_epoch", "best_weights"}`` of an ``EarlyStopping`` callback:
    epochs without improvement, best monitored value, its epoch, the weights then (or None).

    Relies on: ``EarlyStopping`` keeping its progress in these attributes.
    """
    return {name: getattr(callback, name) for name in EARLY_STOPPING_STATE}


def set_early_stopping_state(callback: keras.callbacks.EarlyStopping, state: dict) -> None:
    """Put back a state read by :func:`early_stopping_state` (``best_weights`` optional).

    Relies on: ``EarlyStopping`` keeping its progress in these attributes and resetting them in
    ``on_train_begin`` (so call this after it) and nowhere else.
    """
    callback.wait = int(state["wait"])
    # None until the first epoch ends (a resume point written inside it)
    callback.best = None if state["best"] is None else float(state["best"])
    callback.best_epoch = int(state["best_epoch"])
    callback.best_weights = state.get("best_weights")
