"""The one exception hierarchy of hiertrain.

Every message names the offending value and, where it can, the fix.
"""


class HiertrainError(Exception):
    """Base of every error hiertrain raises on purpose."""


class WireError(HiertrainError, ValueError):
    """Bytes that are not a valid hiertrain wire object (tensor, frame or message)."""


class TopicError(HiertrainError, ValueError):
    """A topic name or a topic's part that does not follow the hiertrain topic tree."""


class ConfigError(HiertrainError, ValueError):
    """A configuration file or option that cannot be used."""


class TransportError(HiertrainError):
    """The MQTT connection failed or was refused."""


class MissingMessage(TransportError, TimeoutError):
    """A message we waited for did not arrive in time.

    Carries what was missing so that callers (and logs) can name the tier, iteration and layer.
    """

    def __init__(self, *, kind: str, sender: str, iteration: int, layer: int, timeout: float):
        self.kind = kind
        self.sender = sender
        self.iteration = iteration
        self.layer = layer
        self.timeout = timeout
        super().__init__(
            f"no {kind!r} from tier {sender!r} for iteration {iteration}, layer {layer} "
            f"within {timeout:g} s"
        )


class TierLost(TransportError):
    """A tier this one depends on went away (its Last Will said ``offline``, or it ``failed``)
    while we waited: the wait ends at once, naming that tier, not after a timeout."""

    def __init__(self, *, tier: str, state: str, waiting_for: str):
        self.tier, self.state = tier, state
        super().__init__(f"tier {tier!r} is {state} (its status said so while we waited for {waiting_for})")


class BrokerError(HiertrainError):
    """The broker could not be configured or started."""


class PlanError(HiertrainError, ValueError):
    """A profile, schedule or planning request that cannot be planned."""


class Diverged(HiertrainError):
    """Training diverged: a loss, weight, activation or gradient is not finite. Names the tier, the
    iteration and the value, and the fix. Never caught to carry on: the run that diverged ends."""


class ProtocolError(HiertrainError):
    """A peer sent what the protocol does not allow at this point (rows without their labels, a
    malformed request or round): the message is refused and named, the service carries on. ``sender``
    names the peer at fault, where one is."""

    def __init__(self, message: str, *, sender: str = "") -> None:
        super().__init__(message)
        self.sender = sender


class SegmentError(HiertrainError):
    """onnxruntime failed running a built segment on the inputs it was given (the segment and the
    kernel's own message named). Non-finite values inside the model, a sign of divergence, fail so."""


class ArtifactError(HiertrainError):
    """A segment artifact that cannot be used: absent, incomplete, not matching its SHA-256, built
    from another model, or refused by the builder asked for it."""
