//! Keeps `vmm-core/api/openapi.yaml` in step with the server: the same endpoints, and
//! schemas whose properties and enum values are exactly what the serde types produce.

use std::collections::BTreeSet;
use std::path::PathBuf;

use plexvm::api::endpoints;
use plexvm_protocol::api::{
    ApiError, BackendState, DeviceInfo, RequestedState, VmInfo, VmState, VmStateRequest,
};
use plexvm_protocol::spec::{BackendSource, DeviceKind};
use serde::Serialize;
use serde_json::Value;

const HTTP_METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

fn openapi() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("read openapi.yaml");
    serde_norway::from_str(&text).expect("openapi.yaml is valid YAML")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("schema {name} missing from openapi.yaml"))
}

/// Follows a `$ref: "#/components/schemas/X"`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("local $ref");
            doc.pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {r}"))
        }
        None => schema,
    }
}

fn string_set(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .expect("a YAML list")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// Checks that `value` (a serialized sample) has exactly the shape `schema` describes:
/// same property names (all required), matching types, enum members.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    if value.is_null() {
        assert_eq!(
            schema["nullable"],
            Value::Bool(true),
            "{at} is null but not nullable"
        );
        return;
    }
    if let Some(members) = schema.get("enum") {
        let v = value
            .as_str()
            .unwrap_or_else(|| panic!("{at} is not a string"));
        assert!(
            string_set(members).contains(v),
            "{at}: {v} is not in the enum"
        );
    }
    match schema["type"].as_str() {
        Some("object") => {
            let object = value
                .as_object()
                .unwrap_or_else(|| panic!("{at} is not an object"));
            let properties = schema["properties"].as_object().expect("properties");
            let got: BTreeSet<_> = object.keys().cloned().collect();
            let documented: BTreeSet<_> = properties.keys().cloned().collect();
            assert_eq!(got, documented, "properties of {at}");
            assert_eq!(string_set(&schema["required"]), got, "required of {at}");
            for (key, v) in object {
                check(doc, &properties[key], v, &format!("{at}.{key}"));
            }
        }
        Some("array") => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{at} is not an array"));
            assert!(!items.is_empty(), "sample for {at} must not be empty");
            for (i, v) in items.iter().enumerate() {
                check(doc, &schema["items"], v, &format!("{at}[{i}]"));
            }
        }
        Some("string") => assert!(value.is_string(), "{at} is not a string"),
        Some("integer") => assert!(value.is_u64() || value.is_i64(), "{at} not an integer"),
        Some("boolean") => assert!(value.is_boolean(), "{at} is not a boolean"),
        other => panic!("{at}: unexpected schema type {other:?}"),
    }
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

fn sample_vm() -> VmInfo {
    let device = |id: &str, kind, pid| DeviceInfo {
        id: id.into(),
        kind,
        mmio_base: 0xd000_0000,
        irq: 5,
        socket: PathBuf::from("/run/plexvm/vm0-blk0.sock"),
        backend_pid: pid,
        state: BackendState::Up,
        activated: true,
        restarts: 3,
        failed_restarts: 1,
        last_exit: pid
            .map(|_| "backend plexvm-blk (pid 6) was killed by signal 9 (SIGKILL)".into()),
        down_ms: 40,
        last_stall_ms: pid.map(|_| 12),
        stalled_ms: pid.map(|_| 1500),
        inflight_tracking: pid.is_some(),
        inflight_state_known: true,
    };
    VmInfo {
        name: "vm0".into(),
        state: VmState::Paused,
        vcpus: 2,
        memory_mib: 512,
        pid: 4242,
        devices: vec![
            device("blk0", DeviceKind::Blk, Some(7)),
            device("net0", DeviceKind::Net, None),
        ],
    }
}

#[test]
fn every_endpoint_is_documented_and_every_documented_path_is_served() {
    let doc = openapi();
    let served: BTreeSet<(String, String)> = endpoints()
        .map(|(m, p)| (m.to_ascii_lowercase(), p.to_owned()))
        .collect();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if HTTP_METHODS.contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    assert_eq!(served, documented);
}

#[test]
fn every_operation_documents_success_and_errors() {
    let doc = openapi();
    for (method, path) in endpoints() {
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|k| k.starts_with('2')),
            "{method} {path}: no 2xx response"
        );
        assert!(
            responses.contains_key("default"),
            "{method} {path}: no default error"
        );
    }
}

#[test]
fn vm_info_schema_matches_the_serde_type() {
    let doc = openapi();
    check(
        &doc,
        schema(&doc, "VmInfo"),
        &to_json(&sample_vm()),
        "VmInfo",
    );
}

#[test]
fn request_and_error_schemas_match_the_serde_types() {
    let doc = openapi();
    let request = VmStateRequest {
        state: RequestedState::Paused,
    };
    check(
        &doc,
        schema(&doc, "VmStateRequest"),
        &to_json(&request),
        "VmStateRequest",
    );
    let error = ApiError {
        error: "no such endpoint: /x".into(),
    };
    check(&doc, schema(&doc, "ApiError"), &to_json(&error), "ApiError");
}

#[test]
fn backend_swap_request_schema_lists_each_variant() {
    let doc = openapi();
    let one_of = schema(&doc, "BackendSwapRequest")["oneOf"]
        .as_array()
        .expect("BackendSwapRequest is a oneOf");
    let samples = [
        BackendSource::Exec(vec!["plexvm-blk".into(), "--image".into(), "d.raw".into()]),
        BackendSource::Socket(PathBuf::from("/run/qsd.sock")),
    ];
    assert_eq!(one_of.len(), samples.len());
    for (i, (variant, sample)) in one_of.iter().zip(&samples).enumerate() {
        check(
            &doc,
            variant,
            &to_json(sample),
            &format!("BackendSwapRequest[{i}]"),
        );
    }
}

/// Serialized names of all variants; the `match` stops compiling when a variant is added,
/// which is the cue to add it to the list beside it (and to openapi.yaml).
fn names<T: Serialize>(all: &[T]) -> BTreeSet<String> {
    all.iter()
        .map(|v| to_json(v).as_str().unwrap().to_owned())
        .collect()
}

fn all_vm_states() -> Vec<VmState> {
    let all = vec![
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopped,
    ];
    for s in &all {
        match s {
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopped => {}
        }
    }
    all
}

fn all_requested_states() -> Vec<RequestedState> {
    let all = vec![
        RequestedState::Running,
        RequestedState::Paused,
        RequestedState::Stopped,
    ];
    for s in &all {
        match s {
            RequestedState::Running | RequestedState::Paused | RequestedState::Stopped => {}
        }
    }
    all
}

fn all_backend_states() -> Vec<BackendState> {
    let all = vec![
        BackendState::Up,
        BackendState::Down,
        BackendState::Reconnecting,
        BackendState::Stalled,
        BackendState::Failed,
    ];
    for s in &all {
        match s {
            BackendState::Up
            | BackendState::Down
            | BackendState::Reconnecting
            | BackendState::Stalled
            | BackendState::Failed => {}
        }
    }
    all
}

fn all_device_kinds() -> Vec<DeviceKind> {
    use DeviceKind::*;
    let all = vec![Net, Blk, Console, Rng, Vsock, Fs, Generic];
    for k in &all {
        match k {
            Net | Blk | Console | Rng | Vsock | Fs | Generic => {}
        }
    }
    all
}

#[test]
fn enum_schemas_list_exactly_the_serde_variants() {
    let doc = openapi();
    let cases = [
        ("VmState", names(&all_vm_states())),
        ("RequestedState", names(&all_requested_states())),
        ("BackendState", names(&all_backend_states())),
        ("DeviceKind", names(&all_device_kinds())),
    ];
    for (name, variants) in cases {
        assert_eq!(string_set(&schema(&doc, name)["enum"]), variants, "{name}");
    }
}
