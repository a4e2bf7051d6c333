from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelManifestRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ModelManifestResponse(_message.Message):
    __slots__ = ("name", "version", "digest", "files", "signature", "key_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    signature: bytes
    key_id: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("name", "version", "path", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    path: str
    offset: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class InstalledModel(_message.Message):
    __slots__ = ("name", "version", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class Rollback(_message.Message):
    __slots__ = ("name", "version", "digest", "reason", "unix_time", "restored_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    RESTORED_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    reason: str
    unix_time: float
    restored_version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., reason: _Optional[str] = ..., unix_time: _Optional[float] = ..., restored_version: _Optional[str] = ...) -> None: ...

class TelemetrySample(_message.Message):
    __slots__ = ("unix_time", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    unix_time: float
    values: _containers.ScalarMap[str, float]
    def __init__(self, unix_time: _Optional[float] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id", "profile", "agent_version", "uptime_s", "models", "counters", "samples", "rollbacks")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    profile: str
    agent_version: str
    uptime_s: float
    models: _containers.RepeatedCompositeFieldContainer[InstalledModel]
    counters: _containers.ScalarMap[str, int]
    samples: _containers.RepeatedCompositeFieldContainer[TelemetrySample]
    rollbacks: _containers.RepeatedCompositeFieldContainer[Rollback]
    def __init__(self, device_id: _Optional[str] = ..., profile: _Optional[str] = ..., agent_version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., models: _Optional[_Iterable[_Union[InstalledModel, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., samples: _Optional[_Iterable[_Union[TelemetrySample, _Mapping]]] = ..., rollbacks: _Optional[_Iterable[_Union[Rollback, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("interval_s", "server_unix_time", "accepted_samples")
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    server_unix_time: float
    accepted_samples: int
    def __init__(self, interval_s: _Optional[float] = ..., server_unix_time: _Optional[float] = ..., accepted_samples: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("include_samples", "device_id")
    INCLUDE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    include_samples: bool
    device_id: str
    def __init__(self, include_samples: _Optional[bool] = ..., device_id: _Optional[str] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("device_id", "profile", "agent_version", "last_seen_unix_time", "uptime_s", "models", "counters", "telemetry", "samples_received", "samples", "rollbacks", "group", "pins")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TelemetryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PinsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    profile: str
    agent_version: str
    last_seen_unix_time: float
    uptime_s: float
    models: _containers.RepeatedCompositeFieldContainer[InstalledModel]
    counters: _containers.ScalarMap[str, int]
    telemetry: _containers.ScalarMap[str, float]
    samples_received: int
    samples: _containers.RepeatedCompositeFieldContainer[TelemetrySample]
    rollbacks: _containers.RepeatedCompositeFieldContainer[Rollback]
    group: str
    pins: _containers.ScalarMap[str, str]
    def __init__(self, device_id: _Optional[str] = ..., profile: _Optional[str] = ..., agent_version: _Optional[str] = ..., last_seen_unix_time: _Optional[float] = ..., uptime_s: _Optional[float] = ..., models: _Optional[_Iterable[_Union[InstalledModel, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., telemetry: _Optional[_Mapping[str, float]] = ..., samples_received: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[TelemetrySample, _Mapping]]] = ..., rollbacks: _Optional[_Iterable[_Union[Rollback, _Mapping]]] = ..., group: _Optional[str] = ..., pins: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ...) -> None: ...
