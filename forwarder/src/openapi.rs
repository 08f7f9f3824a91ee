//! The OpenAPI 3.1 document of the HTTP interface.
//!
//! Kept by hand in `docs/openapi.json` and embedded here: the forwarding
//! handlers take their bodies as raw bytes (the envelope is byte-transparent),
//! so a derive-based generator would see no request types to describe. The
//! integration test `openapi` keeps the document and the code in step: every
//! `.route(...)` in the sources needs an operation and every operation a
//! route, the error codes must equal [`crate::api::ApiError`]'s, and the
//! version the crate's.

use std::collections::BTreeSet;

/// The document, byte for byte as committed.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// HTTP methods an OpenAPI path item can hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Every operation of a document as `(METHOD, path)`, e.g.
/// `("POST", "/v1/chat/completions")`.
pub fn operations(doc: &serde_json::Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    let Some(paths) = doc.get("paths").and_then(serde_json::Value::as_object) else {
        return ops;
    };
    for (path, item) in paths {
        for m in METHODS {
            if item.get(m).is_some() {
                ops.insert((m.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_document_parses_and_lists_operations() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("docs/openapi.json");
        let ops = operations(&doc);
        assert!(ops.contains(&("POST".into(), "/v1/chat/completions".into())));
        assert!(ops.contains(&("GET".into(), "/openapi.json".into())));
        assert!(!ops.iter().any(|(m, _)| m == "PARAMETERS"));
    }
}
