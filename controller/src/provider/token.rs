//! Stable hashes and idempotency tokens: the same intent always gives the same token, across
//! restarts and releases.

use fleetlb_crds::BackendCluster;

/// The subnet of launch attempt `attempt` of `slot`: a function of the intent alone, so a
/// replayed launch (same `ClientToken`) always carries the same `SubnetId`, as EC2 requires of
/// an idempotent repeat. Consecutive slots walk through the subnets, so a fleet spreads over
/// them; a slot's attempts after a shortage move to the next one, and a replacement starts at
/// an attempt that maps to the slot's own subnet again (see `reconcile::plan`), so the spread
/// stays even.
pub fn subnet_for(subnets: &[String], slot: u32, attempt: u32) -> Option<&str> {
    if subnets.is_empty() {
        return None;
    }
    let k = (u64::from(slot) + u64::from(attempt)) % subnets.len() as u64;
    subnets.get(usize::try_from(k).ok()?).map(String::as_str)
}

/// Stable 64-bit FNV-1a, for spec hashes and tokens that must not change across releases.
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hash of the spec fields whose change requires new instances (type, port, provider settings).
pub fn spec_hash(bc: &BackendCluster) -> String {
    let s = &bc.spec;
    // `arm64ImageId` stays out: an instance's image is checked against its own type's image
    // (`Instance::drift`), so changing the arm64 image replaces only arm64 instances, and
    // setting it leaves every hash written before it existed as it was.
    let provider = match &s.provider {
        fleetlb_crds::ProviderSpec::Aws(a) if a.arm64_image_id.is_some() => {
            let mut a = a.clone();
            a.arm64_image_id = None;
            serde_json::to_string(&fleetlb_crds::ProviderSpec::Aws(a))
        }
        p => serde_json::to_string(p),
    }
    .unwrap_or_default();
    // One type hashes as `instanceType` always has (no replacements on upgrade). Several are
    // left out: adding, dropping or reordering fallback types replaces nothing (an instance of
    // a type no longer listed is drift of its own, see `Instance::drift`).
    let types = match s.instance_types().as_slice() {
        [one] => (*one).to_string(),
        _ => "*".to_string(),
    };
    let mut key = format!("{types}|{}|{}", s.port, provider);
    // A local instance serves gRPC only when launched for it; an EC2 instance's software is
    // its image's, so its protocol never asks for a replacement (and HTTP1 keeps every hash
    // written before the field existed).
    if matches!(s.provider, fleetlb_crds::ProviderSpec::Local(_))
        && s.protocol == fleetlb_crds::Protocol::Grpc
    {
        key.push_str("|grpc");
    }
    format!("{:016x}", fnv64(key.as_bytes()))
}

/// The instance type of a slot's attempt: types in order of preference, each tried in a
/// subnet before the next subnet ([`subnet_for`] of `attempt / types`), so within a zone the
/// preferred type with capacity wins. With one type it is always that type.
pub fn type_for(types: &[&str], attempt: u32) -> String {
    if types.is_empty() {
        return String::new();
    }
    types[attempt as usize % types.len()].to_string()
}

/// [`client_token`] within `scope` (see [`Provider::token_scope`]); an empty scope gives
/// [`client_token`]'s token.
pub fn scoped_token(scope: &str, uid: &str, slot: u32, spec_hash: &str, attempt: u32) -> String {
    if scope.is_empty() {
        client_token(uid, slot, spec_hash, attempt)
    } else {
        client_token(&format!("{scope}/{uid}"), slot, spec_hash, attempt)
    }
}

/// The idempotency token of one launch intent (at most 64 ASCII characters): the same owner
/// UID, slot, spec hash and attempt always give the same token.
pub fn client_token(uid: &str, slot: u32, spec_hash: &str, attempt: u32) -> String {
    let h = fnv64(format!("{uid}|{slot}|{spec_hash}|{attempt}").as_bytes());
    format!("fleetlb-{h:016x}-{slot}-{attempt}")
}
