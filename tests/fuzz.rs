//! Fuzzing of the parsers that take outside input, with proptest (bounded: 512 cases per
//! property in CI, `EC2_KUBELET_FUZZ_CASES=100000` for a longer run). Each property states
//! what must hold for any input, not just that nothing panics:
//! - pod annotations: a launch either resolves or fails naming the annotation at fault;
//! - user data: the multi-part document always has the user's part intact and the agent
//!   bootstrap last, whatever the user part contains;
//! - resource quantities: finite when accepted; canonical forms round-trip;
//! - agent messages: any bytes decode to a spec the agent refuses or accepts without panicking;
//!   bootstrap tokens: only the authority's own token for the right nonce is accepted.

use std::collections::BTreeMap;

use ec2_kubelet::cloud::bootstrap::{AgentBootstrap, user_data};
use ec2_kubelet::crd::{Ec2NodePoolSpec, annotations};
use ec2_kubelet::launch::settings::resolve;
use ec2_kubelet::launch::sizing::parse_quantity;
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    let cases = std::env::var("EC2_KUBELET_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn pool() -> Ec2NodePoolSpec {
    serde_json::from_value(serde_json::json!({"nodes": 1, "subnetIds": ["subnet-0a"]})).unwrap()
}

/// Strings shaped like annotation values: mostly printable, with separators and odd bytes.
fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.,=/ :-]{0,40}",
        "(ami|subnet|sg)-[0-9a-fA-F]{0,20}",
        any::<String>(),
        "[a-z]+=[^,]{0,300}(,[a-z]*=?[^,]{0,20}){0,4}",
    ]
}

/// The parts of a MIME multipart document with `boundary`: (content type, body).
fn mime_parts(document: &str) -> Vec<(String, String)> {
    let boundary = document
        .split("boundary=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a boundary");
    let delimiter = format!("\n--{boundary}");
    let body = format!("\n{}", document.split_once("\n\n").expect("headers end").1);
    let end = body.find(&format!("{delimiter}--")).expect("a closing delimiter");
    body[..end]
        .split(&delimiter)
        .skip(1)
        .map(|part| {
            let (headers, content) = part.split_once("\n\n").expect("part headers end");
            let content_type = headers
                .lines()
                .find_map(|l| l.strip_prefix("Content-Type: "))
                .unwrap_or_default()
                .to_string();
            // The line break before a delimiter belongs to the delimiter (RFC 2046).
            (content_type, content.to_string())
        })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn annotations_resolve_or_name_the_annotation_at_fault(
        key in prop::sample::select(annotations::USER_SET.to_vec()),
        value in annotation_value(),
    ) {
        let pod_annotations = BTreeMap::from([
            (key.to_string(), value.clone()),
            (annotations::IMAGE_ID.to_string(), "ami-0123456789abcdef0".to_string()),
        ]);
        match resolve(&pool(), None, None, &pod_annotations, "uid-1", "subnet-0a") {
            Ok(settings) => {
                // Accepted values arrive as given, never silently replaced (a blank value
                // counts as no annotation).
                let blank = value.trim().is_empty();
                if key == annotations::SUBNET_ID && !blank {
                    prop_assert_eq!(settings.subnet_id, value.trim());
                }
                if key == annotations::SPOT && !blank {
                    prop_assert_eq!(settings.spot.to_string(), value.trim());
                }
                if key == annotations::USER_DATA {
                    prop_assert_eq!(settings.user_data.as_deref(), Some(value.as_str()));
                }
                if key == annotations::TAGS {
                    prop_assert!(settings.tags.keys().all(|k| !k.starts_with("ec2-kubelet.io/") && !k.starts_with("aws:")));
                }
            }
            Err(error) => prop_assert_eq!(error.field, key),
        }
    }

    #[test]
    fn user_data_keeps_the_user_part_whole_and_the_bootstrap_last(user in prop_oneof![
        any::<String>(),
        "#!/bin/sh\n[ -~\n]{0,200}",
        // Hostile: the user part tries to close the document early.
        "[ -~\n]{0,40}\n--==ec2-kubelet-boundary==--\n[ -~\n]{0,40}",
        "[ -~\n]{0,40}\n--[=a-z-]{0,30}\n[ -~\n]{0,40}",
    ]) {
        let bootstrap = AgentBootstrap::default();
        let document = user_data(Some(&user), &bootstrap);
        let parts = mime_parts(&document);
        let script = bootstrap.script();
        let last = parts.last().expect("at least the bootstrap");
        prop_assert_eq!(&last.1, &script, "the agent bootstrap is the last part, intact");
        if user.trim().is_empty() {
            prop_assert_eq!(parts.len(), 1);
        } else {
            prop_assert_eq!(parts.len(), 2, "{}", document);
            prop_assert_eq!(&parts[0].1, &user, "the user part, byte for byte");
        }
    }

    #[test]
    fn quantities_are_finite_and_canonical_forms_round_trip(
        text in prop_oneof![any::<String>(), "[-+]?[0-9]{0,30}(\\.[0-9]{0,10})?([eE][-+]?[0-9]{1,4})?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?"],
        whole in 0u32..1_000_000,
        suffix in prop::sample::select(vec![("", 1.0), ("m", 1e-3), ("k", 1e3), ("Mi", 1048576.0), ("Gi", 1073741824.0)]),
    ) {
        if let Ok(value) = parse_quantity(&text) {
            prop_assert!(value.is_finite(), "{:?} parsed to {}", text, value);
        }
        let canonical = format!("{whole}{}", suffix.0);
        let parsed = parse_quantity(&canonical).unwrap();
        prop_assert!((parsed - f64::from(whole) * suffix.1).abs() <= parsed.abs() * 1e-12);
    }

    #[test]
    fn agent_messages_from_any_bytes_are_refused_or_accepted_without_harm(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(request) = ec2_kubelet_protocol::v1::LaunchPodRequest::decode(bytes.as_slice())
            && let Some(spec) = request.pod
        {
            // Whatever it says, a spec is either refused with a reason or accepted; an
            // accepted one names only DNS-label containers and volumes.
            if ec2_kubelet_agent::runtime::validate_spec(&spec).is_ok() {
                prop_assert!(spec.containers.iter().all(|c| !c.name.is_empty() && !c.name.contains('/')));
            }
        }
        let _ = ec2_kubelet_protocol::v1::ExecInput::decode(bytes.as_slice());
    }

    #[test]
    fn bootstrap_tokens_are_accepted_only_as_minted(
        garbage in any::<String>(),
        nonce in "[a-f0-9]{32}",
        flip in 0usize..200,
    ) {
        let authority = authority();
        let now = ec2_kubelet_protocol::util::now_ms();
        prop_assert!(authority.check_token(&garbage, now).is_err());
        let token = authority.mint_token(&nonce, std::time::Duration::from_secs(3600));
        prop_assert_eq!(authority.check_token(&token, now).map(|(n, _)| n).ok(), Some(nonce.clone()));
        // Any one changed character spoils it.
        let mut bytes = token.clone().into_bytes();
        let i = flip % bytes.len();
        bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(bytes).unwrap();
        if tampered != token {
            prop_assert!(authority.check_token(&tampered, now).is_err(), "{}", tampered);
        }
    }
}

fn authority() -> &'static ec2_kubelet_protocol::pki::Authority {
    static AUTHORITY: std::sync::OnceLock<ec2_kubelet_protocol::pki::Authority> = std::sync::OnceLock::new();
    AUTHORITY.get_or_init(|| ec2_kubelet_protocol::pki::Authority::generate().unwrap())
}
