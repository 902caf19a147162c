//! Secure aggregation by pairwise masking (Bonawitz et al., CCS 2017): the coordinator
//! learns the sum of the surviving clients' updates and nothing else, even when clients
//! drop out part-way.
//!
//! The round, for participants `U1` (those who advertised keys):
//! 1. **advertise** — each client makes two X25519 key pairs (`c` to encrypt shares, `s` to
//!    agree pairwise masks) and a random self-mask seed `b`, and sends both public keys;
//! 2. **share keys** — each client splits `s_sk` and `b` with Shamir's scheme
//!    (threshold `t`, GF(2⁸) byte-wise, x = its 1-based position in `U1`) and sends each
//!    peer its shares encrypted with ChaCha20-Poly1305 under the `c` key agreed with that
//!    peer (the coordinator relays ciphertexts it cannot read); `U2` = those who sent;
//! 3. **masked input** — each client in `U2` sends
//!    `y_u = x_u + PRG(b_u) + Σ_{v∈U2, v>u} PRG(s_uv) − Σ_{v∈U2, v<u} PRG(s_uv)` in ℤ/2³²,
//!    with `x_u` the fixed-point update; `U3` = those who sent;
//! 4. **unmask** — each client in `U3` returns, for every `v ∈ U2`, the share of `b_v` if
//!    `v ∈ U3`, or of `s_sk_v` if `v` dropped — never both for one client (a client refuses
//!    inconsistent requests). With ≥ `t` answers the coordinator reconstructs the self masks
//!    of the survivors and the mask keys of the dropped, removes those masks, and is left
//!    with `Σ_{u∈U3} x_u`.
//!
//! Pairwise mask seeds are `SHA-256("mote-secagg/mask" ‖ round ‖ DH(s_u, s_v))` expanded
//! with ChaCha20. Shamir over GF(2⁸) limits a round to 255 participants.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::error::{FedError, Result};

/// Most participants in one secure-aggregation round (Shamir x-coordinates are bytes).
pub const MAX_PARTICIPANTS: usize = 255;
/// Fixed-point scale: a value `v` travels as `round(v · 2¹⁶)` in ℤ/2³².
const SCALE: f64 = 65536.0;

fn err(why: impl Into<String>) -> FedError {
    FedError::SecAgg(why.into())
}

/// Random bytes from the operating system.
fn random32() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| err(format!("no OS randomness: {e}")))?;
    Ok(b)
}

/// A client's secrets for one round.
pub struct ClientSecrets {
    c_sk: StaticSecret,
    s_sk: [u8; 32],
    b: [u8; 32],
    /// Share ciphers by peer key: the agreement is made once per peer and round, when the
    /// shares are encrypted, and reused to decrypt the peer's shares at unmasking.
    ciphers: Mutex<HashMap<[u8; 32], ChaCha20Poly1305>>,
}

/// What a client advertises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// Node id.
    pub node: String,
    /// Public key for share encryption.
    #[serde(with = "hex32")]
    pub c_pk: [u8; 32],
    /// Public key for mask agreement.
    #[serde(with = "hex32")]
    pub s_pk: [u8; 32],
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

impl ClientSecrets {
    /// Fresh keys and self-mask seed from OS randomness.
    pub fn generate(node: &str) -> Result<(ClientSecrets, Advert)> {
        let c_sk = StaticSecret::from(random32()?);
        let s_sk = random32()?;
        let b = random32()?;
        let advert = Advert {
            node: node.to_string(),
            c_pk: PublicKey::from(&c_sk).to_bytes(),
            s_pk: PublicKey::from(&StaticSecret::from(s_sk)).to_bytes(),
        };
        let ciphers = Mutex::default();
        Ok((
            ClientSecrets {
                c_sk,
                s_sk,
                b,
                ciphers,
            },
            advert,
        ))
    }

    /// The share cipher with the peer whose encryption key is `peer_c_pk`.
    fn cipher(&self, peer_c_pk: &[u8; 32]) -> ChaCha20Poly1305 {
        let mut ciphers = self.ciphers.lock().unwrap_or_else(|e| e.into_inner());
        ciphers
            .entry(*peer_c_pk)
            .or_insert_with(|| cipher(&self.c_sk, peer_c_pk))
            .clone()
    }
}

// ---- GF(2^8) Shamir ---------------------------------------------------------------------

/// Exponentials and logarithms of GF(2⁸) (polynomial x⁸ + x⁴ + x³ + x + 1, generator 3),
/// built at compile time: a multiplication is two lookups and an add.
const GF_TABLES: ([u8; 512], [u8; 256]) = {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        exp[i + 255] = x as u8;
        log[x as usize] = i as u8;
        // x *= 3: x ^ (x << 1), reduced.
        let mut y = x ^ (x << 1);
        if y & 0x100 != 0 {
            y ^= 0x11b;
        }
        x = y;
        i += 1;
    }
    (exp, log)
};

fn gf_mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    let (exp, log) = &GF_TABLES;
    exp[log[a as usize] as usize + log[b as usize] as usize]
}

fn gf_inv(a: u8) -> u8 {
    // a⁻¹ = 3^(255 − log a); 0 has no inverse (callers never pass it).
    let (exp, log) = &GF_TABLES;
    exp[(255 - log[a as usize] as usize) % 255]
}

/// The schoolbook product, the reference the tables are checked against.
#[cfg(test)]
fn gf_mul_slow(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let hi = a & 0x80;
        a <<= 1;
        if hi != 0 {
            a ^= 0x1b; // x^8 + x^4 + x^3 + x + 1
        }
        b >>= 1;
    }
    p
}

/// A share: its x-coordinate and one y byte per secret byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// x (1..=255).
    pub x: u8,
    /// y bytes.
    #[serde(with = "hex32")]
    pub y: [u8; 32],
}

/// Split `secret` into shares for x = 1..=n, any `t` of which recover it.
pub fn shamir_split(secret: &[u8; 32], t: usize, n: usize) -> Result<Vec<Share>> {
    if t == 0 || t > n || n > MAX_PARTICIPANTS {
        return Err(err(format!(
            "cannot split into {n} shares with threshold {t}"
        )));
    }
    let mut coeffs = vec![[0u8; 32]; t - 1];
    for c in &mut coeffs {
        *c = random32()?;
    }
    Ok((1..=n as u8)
        .map(|x| {
            let mut y = [0u8; 32];
            for (i, yb) in y.iter_mut().enumerate() {
                // Horner: ((a_{t-1} x + a_{t-2}) x + ...) x + secret.
                let mut acc = 0u8;
                for c in coeffs.iter().rev() {
                    acc = gf_mul(acc, x) ^ c[i];
                }
                *yb = gf_mul(acc, x) ^ secret[i];
            }
            Share { x, y }
        })
        .collect())
}

/// Recover the secret from at least `t` distinct shares (Lagrange at 0).
pub fn shamir_combine(shares: &[Share], t: usize) -> Result<[u8; 32]> {
    let xs: BTreeSet<u8> = shares.iter().map(|s| s.x).collect();
    if xs.len() != shares.len() || xs.contains(&0) {
        return Err(err("shares repeat an x-coordinate or use x = 0"));
    }
    if shares.len() < t {
        return Err(err(format!(
            "{} shares received, {t} needed to recover a secret",
            shares.len()
        )));
    }
    let used = &shares[..t];
    let mut out = [0u8; 32];
    for (j, sj) in used.iter().enumerate() {
        let mut l = 1u8;
        for (m, sm) in used.iter().enumerate() {
            if m != j {
                l = gf_mul(l, gf_mul(sm.x, gf_inv(sm.x ^ sj.x)));
            }
        }
        for (o, y) in out.iter_mut().zip(&sj.y) {
            *o ^= gf_mul(l, *y);
        }
    }
    Ok(out)
}

// ---- masks and encryption ---------------------------------------------------------------

fn prg_add(acc: &mut [u32], seed: [u8; 32], sign: i8) {
    let mut rng = ChaCha20Rng::from_seed(seed);
    for a in acc.iter_mut() {
        let m = rng.next_u32();
        *a = if sign > 0 {
            a.wrapping_add(m)
        } else {
            a.wrapping_sub(m)
        };
    }
}

fn pair_seed(round: u64, s_sk: &[u8; 32], peer_s_pk: &[u8; 32]) -> [u8; 32] {
    let shared = StaticSecret::from(*s_sk).diffie_hellman(&PublicKey::from(*peer_s_pk));
    let mut h = Sha256::new();
    h.update(b"mote-secagg/mask");
    h.update(round.to_le_bytes());
    h.update(shared.as_bytes());
    h.finalize().into()
}

fn self_seed(round: u64, b: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mote-secagg/self");
    h.update(round.to_le_bytes());
    h.update(b);
    h.finalize().into()
}

fn cipher(c_sk: &StaticSecret, peer_c_pk: &[u8; 32]) -> ChaCha20Poly1305 {
    let shared = c_sk.diffie_hellman(&PublicKey::from(*peer_c_pk));
    let key: [u8; 32] = Sha256::new()
        .chain_update(b"mote-secagg/enc")
        .chain_update(shared.as_bytes())
        .finalize()
        .into();
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

fn nonce(round: u64, from: &str, to: &str) -> [u8; 12] {
    let h = Sha256::new()
        .chain_update(round.to_le_bytes())
        .chain_update((from.len() as u64).to_le_bytes())
        .chain_update(from)
        .chain_update(to)
        .finalize();
    h[..12].try_into().expect("12 bytes")
}

#[derive(Serialize, Deserialize)]
struct SharePair {
    from: String,
    to: String,
    s: Share,
    b: Share,
}

/// Check the advertised set: sorted, unique, within the limit, distinct keys.
fn check_adverts(adverts: &[Advert]) -> Result<()> {
    if adverts.len() > MAX_PARTICIPANTS {
        return Err(err(format!(
            "{} participants; secure aggregation supports at most {MAX_PARTICIPANTS} per round (lower sampling.fraction)",
            adverts.len()
        )));
    }
    if !adverts.windows(2).all(|w| w[0].node < w[1].node) {
        return Err(err("the participant list is not sorted and unique"));
    }
    Ok(())
}

/// Step 2: encrypted shares of `s_sk` and `b` for every participant (by node id).
pub fn share_keys(
    me: &str,
    secrets: &ClientSecrets,
    round: u64,
    adverts: &[Advert],
    t: usize,
) -> Result<BTreeMap<String, Vec<u8>>> {
    check_adverts(adverts)?;
    if !adverts.iter().any(|a| a.node == me) {
        return Err(err(format!("{me} is not among the participants")));
    }
    let s = shamir_split(&secrets.s_sk, t, adverts.len())?;
    let b = shamir_split(&secrets.b, t, adverts.len())?;
    let mut out = BTreeMap::new();
    for ((a, s), b) in adverts.iter().zip(s).zip(b) {
        let plain = serde_json::to_vec(&SharePair {
            from: me.into(),
            to: a.node.clone(),
            s,
            b,
        })
        .expect("json");
        let ct = secrets
            .cipher(&a.c_pk)
            .encrypt(
                Nonce::from_slice(&nonce(round, me, &a.node)),
                plain.as_ref(),
            )
            .map_err(|_| err("share encryption failed"))?;
        out.insert(a.node.clone(), ct);
    }
    Ok(out)
}

/// Fixed-point encoding of an update (values clipped to ±`clip`).
pub fn encode_fixed(x: &[f32], clip: f32) -> Vec<u32> {
    x.iter()
        .map(|&v| ((v.clamp(-clip, clip) as f64 * SCALE).round() as i64 as i32) as u32)
        .collect()
}

/// Decode a sum of fixed-point vectors.
pub fn decode_fixed(sum: &[u32]) -> Vec<f64> {
    sum.iter().map(|&s| s as i32 as f64 / SCALE).collect()
}

/// Largest participant count whose fixed-point sum cannot overflow for `clip`.
pub fn max_sum_terms(clip: f32) -> usize {
    ((i32::MAX as f64) / (clip as f64 * SCALE)).floor() as usize
}

/// Step 3: the masked input of `x` (fixed point) for the participants `u2` (who shared).
pub fn mask(
    me: &str,
    secrets: &ClientSecrets,
    round: u64,
    u2: &[Advert],
    x: &[u32],
) -> Result<Vec<u32>> {
    check_adverts(u2)?;
    let mut y = x.to_vec();
    prg_add(&mut y, self_seed(round, &secrets.b), 1);
    for a in u2.iter().filter(|a| a.node != me) {
        let sign = if me < a.node.as_str() { 1 } else { -1 };
        prg_add(&mut y, pair_seed(round, &secrets.s_sk, &a.s_pk), sign);
    }
    Ok(y)
}

/// Step 4 answer: shares of self-mask seeds of survivors, and of mask keys of the dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskReply {
    /// Shares of `b_v` for `v` in `U3`.
    pub b_shares: BTreeMap<String, Share>,
    /// Shares of `s_sk_v` for `v` in `U2 \ U3`.
    pub s_shares: BTreeMap<String, Share>,
}

/// Step 4: decrypt the shares received from `U2` and reveal what the coordinator may have.
pub fn unmask(
    me: &str,
    secrets: &ClientSecrets,
    round: u64,
    u2: &[Advert],
    received: &BTreeMap<String, Vec<u8>>,
    survivors: &BTreeSet<String>,
) -> Result<UnmaskReply> {
    check_adverts(u2)?;
    if !survivors.contains(me) {
        return Err(err(
            "asked to unmask a round this client is not a survivor of",
        ));
    }
    if survivors.iter().any(|s| !u2.iter().any(|a| &a.node == s)) {
        return Err(err(
            "the survivor list names clients that never shared keys; refusing to reveal",
        ));
    }
    let mut reply = UnmaskReply::default();
    for a in u2 {
        let ct = received
            .get(&a.node)
            .ok_or_else(|| err(format!("no shares were relayed from {}", a.node)))?;
        let plain = secrets
            .cipher(&a.c_pk)
            .decrypt(Nonce::from_slice(&nonce(round, &a.node, me)), ct.as_ref())
            .map_err(|_| err(format!("the shares from {} do not decrypt", a.node)))?;
        let pair: SharePair = serde_json::from_slice(&plain)
            .map_err(|_| err(format!("the shares from {} are malformed", a.node)))?;
        if pair.from != a.node || pair.to != me {
            return Err(err(format!("the shares from {} were misaddressed", a.node)));
        }
        // Exactly one of the two, never both, for any client.
        if survivors.contains(&a.node) {
            reply.b_shares.insert(a.node.clone(), pair.b);
        } else {
            reply.s_shares.insert(a.node.clone(), pair.s);
        }
    }
    Ok(reply)
}

/// The coordinator's last step: remove the masks and return `Σ_{u∈U3} x_u`.
/// `masked` holds the masked inputs of `U3`; `replies` the unmask answers.
pub fn recover(
    round: u64,
    u2: &[Advert],
    masked: &BTreeMap<String, Vec<u32>>,
    replies: &[UnmaskReply],
    t: usize,
    d: usize,
) -> Result<Vec<u32>> {
    check_adverts(u2)?;
    if replies.len() < t {
        return Err(err(format!(
            "{} clients answered the unmask step, {t} needed; the round cannot be recovered",
            replies.len()
        )));
    }
    let mut sum = vec![0u32; d];
    for (node, y) in masked {
        if y.len() != d || !u2.iter().any(|a| &a.node == node) {
            return Err(err(format!(
                "the masked input of {node} does not fit the round"
            )));
        }
        sum.iter_mut()
            .zip(y)
            .for_each(|(s, v)| *s = s.wrapping_add(*v));
    }
    for a in u2 {
        if masked.contains_key(&a.node) {
            let shares: Vec<Share> = replies
                .iter()
                .filter_map(|r| r.b_shares.get(&a.node).cloned())
                .collect();
            let b = shamir_combine(&shares, t)?;
            prg_add(&mut sum, self_seed(round, &b), -1);
        } else {
            // Dropped after sharing: rebuild its mask key and cancel the masks its
            // surviving peers added for it.
            let shares: Vec<Share> = replies
                .iter()
                .filter_map(|r| r.s_shares.get(&a.node).cloned())
                .collect();
            let s_sk = shamir_combine(&shares, t)?;
            if PublicKey::from(&StaticSecret::from(s_sk)).to_bytes() != a.s_pk {
                return Err(err(format!(
                    "the recovered mask key of {} does not match its public key (a share is wrong)",
                    a.node
                )));
            }
            for v in u2.iter().filter(|v| masked.contains_key(&v.node)) {
                // v added sign(v, a)·PRG(s_va); subtract it.
                let sign = if v.node < a.node { -1 } else { 1 };
                prg_add(&mut sum, pair_seed(round, &s_sk, &v.s_pk), sign);
            }
        }
    }
    Ok(sum)
}

// ---- the protocol's messages and a client's side of a round ----------------------------

/// `TRAIN` task payload when secure aggregation is on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainTask {
    /// A client's weight is `examples / weight_scale` (the largest sampled node's example
    /// count, so weights are in [0, 1]); `None` gives every client weight 1 (DP runs).
    pub weight_scale: Option<f64>,
}

/// `SHARE_KEYS` task payload: the participants `U1` and the threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShareKeysTask {
    /// Shares needed to recover a secret.
    pub threshold: usize,
    /// Everyone who advertised keys, sorted by node id.
    pub participants: Vec<Advert>,
}

/// `SHARE_KEYS` answer: encrypted shares per recipient (hex).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShareKeysReply {
    /// Recipient node id → ChaCha20-Poly1305 ciphertext of its shares, hex.
    pub shares: BTreeMap<String, String>,
}

/// `MASKED_INPUT` task payload: `U2` and the ciphertexts addressed to this client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskedInputTask {
    /// Everyone who shared keys, sorted by node id.
    pub participants: Vec<Advert>,
    /// Sender node id → ciphertext (hex) for this client.
    pub inbox: BTreeMap<String, String>,
}

/// `UNMASK` task payload: `U3`, the clients whose masked input arrived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskTask {
    /// Survivors, sorted.
    pub survivors: BTreeSet<String>,
}

/// The threshold for `n` advertised participants: `⌈fraction·n⌉`, but always a strict
/// majority (two disjoint groups can never both reach it) and at least 2.
pub fn threshold(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).ceil() as usize)
        .max(n / 2 + 1)
        .max(2)
        .min(n)
}

/// Route `U2`'s share ciphertexts: recipient → (sender → ciphertext).
pub fn route(
    replies: &BTreeMap<String, ShareKeysReply>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut inboxes: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (from, reply) in replies {
        for (to, ct) in &reply.shares {
            if replies.contains_key(to) {
                inboxes
                    .entry(to.clone())
                    .or_default()
                    .insert(from.clone(), ct.clone());
            }
        }
    }
    inboxes
}

/// What a client sent as its masked input: `U2`, the share ciphertexts it received, `y`.
type Masked = (Vec<Advert>, BTreeMap<String, Vec<u8>>, Vec<u32>);

/// A client's side of one secure-aggregation round. It keeps its secrets, answers each step
/// at most one way (a repeated identical request gets the same answer, a different one is
/// refused), and checks what the coordinator claims before revealing anything.
pub struct ClientRound {
    node: String,
    round: u64,
    secrets: ClientSecrets,
    advert: Advert,
    x: Vec<u32>,
    keys: Option<(ShareKeysTask, ShareKeysReply)>,
    masked: Option<Masked>,
    unmasked: Option<(BTreeSet<String>, UnmaskReply)>,
}

impl ClientRound {
    /// Fresh secrets for `round`, holding the fixed-point input `x`; returns the advert.
    pub fn new(node: &str, round: u64, x: Vec<u32>) -> Result<(ClientRound, Advert)> {
        let (secrets, advert) = ClientSecrets::generate(node)?;
        Ok((
            ClientRound {
                node: node.into(),
                round,
                secrets,
                advert: advert.clone(),
                x,
                keys: None,
                masked: None,
                unmasked: None,
            },
            advert,
        ))
    }

    /// The round this state belongs to.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Step 2: encrypted shares for every participant.
    pub fn share_keys(&mut self, task: &ShareKeysTask) -> Result<ShareKeysReply> {
        if let Some((seen, reply)) = &self.keys {
            return if seen == task {
                Ok(reply.clone())
            } else {
                Err(err(
                    "asked to share keys twice with different participants; refusing",
                ))
            };
        }
        let n = task.participants.len();
        if !task.participants.contains(&self.advert) {
            return Err(err(
                "the participant list does not carry this client's keys; refusing",
            ));
        }
        if task.threshold < 2 || task.threshold * 2 <= n || task.threshold > n {
            return Err(err(format!(
                "threshold {} for {n} participants is not a strict majority of at least 2; refusing",
                task.threshold
            )));
        }
        let shares = share_keys(
            &self.node,
            &self.secrets,
            self.round,
            &task.participants,
            task.threshold,
        )?;
        let reply = ShareKeysReply {
            shares: shares
                .into_iter()
                .map(|(k, v)| (k, hex::encode(v)))
                .collect(),
        };
        self.keys = Some((task.clone(), reply.clone()));
        Ok(reply)
    }

    /// Step 3: the masked input.
    pub fn masked_input(&mut self, task: &MaskedInputTask) -> Result<Vec<u32>> {
        let Some((keys, _)) = &self.keys else {
            return Err(err("asked for a masked input before sharing keys"));
        };
        if let Some((u2, _, y)) = &self.masked {
            return if *u2 == task.participants {
                Ok(y.clone())
            } else {
                Err(err(
                    "asked for a second masked input with different participants; refusing",
                ))
            };
        }
        let u2 = &task.participants;
        if !u2.iter().all(|a| keys.participants.contains(a)) || !u2.contains(&self.advert) {
            return Err(err(
                "the masked-input participants are not a subset of those keys were shared with; refusing",
            ));
        }
        if u2.len() < keys.threshold {
            return Err(err(format!(
                "only {} clients shared keys, {} needed; refusing to send a masked input",
                u2.len(),
                keys.threshold
            )));
        }
        let mut inbox = BTreeMap::new();
        for a in u2 {
            let ct = task
                .inbox
                .get(&a.node)
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| err(format!("the shares of {} were not relayed", a.node)))?;
            inbox.insert(a.node.clone(), ct);
        }
        let y = mask(&self.node, &self.secrets, self.round, u2, &self.x)?;
        self.masked = Some((u2.clone(), inbox, y.clone()));
        Ok(y)
    }

    /// Step 4: the shares the coordinator needs to remove the masks of `U3`.
    pub fn unmask(&mut self, task: &UnmaskTask) -> Result<UnmaskReply> {
        let (Some((keys, _)), Some((u2, inbox, _))) = (&self.keys, &self.masked) else {
            return Err(err("asked to unmask before sending a masked input"));
        };
        if let Some((seen, reply)) = &self.unmasked {
            return if *seen == task.survivors {
                Ok(reply.clone())
            } else {
                Err(err(
                    "asked to unmask twice with different survivors; refusing (that could reveal an individual update)",
                ))
            };
        }
        if task.survivors.len() < keys.threshold {
            return Err(err(format!(
                "only {} survivors, {} needed; refusing to unmask",
                task.survivors.len(),
                keys.threshold
            )));
        }
        let reply = unmask(
            &self.node,
            &self.secrets,
            self.round,
            u2,
            inbox,
            &task.survivors,
        )?;
        self.unmasked = Some((task.survivors.clone(), reply.clone()));
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shamir_recovers_from_any_t_and_not_fewer() {
        let secret = random32().unwrap();
        let shares = shamir_split(&secret, 3, 6).unwrap();
        for pick in [[0, 1, 2], [5, 3, 1], [2, 4, 5]] {
            let s: Vec<Share> = pick.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(shamir_combine(&s, 3).unwrap(), secret);
        }
        assert!(shamir_combine(&shares[..2], 3).is_err());
        // Two shares of a threshold-3 secret are consistent with every secret: combining
        // them as if t were 2 gives garbage.
        assert_ne!(shamir_combine(&shares[..2], 2).unwrap(), secret);
        for a in 1..=255u8 {
            assert_eq!(gf_mul(a, gf_inv(a)), 1);
            for b in 0..=255u8 {
                assert_eq!(gf_mul(a, b), gf_mul_slow(a, b), "{a} * {b}");
            }
        }
        assert_eq!(gf_mul(0, 7), 0);
    }

    struct Party {
        node: String,
        secrets: ClientSecrets,
        advert: Advert,
        x: Vec<u32>,
        inbox: BTreeMap<String, Vec<u8>>,
    }

    /// (recovered sum, plain sum of the survivors, masked inputs the coordinator held).
    type Outcome = (Vec<u32>, Vec<u32>, BTreeMap<String, Vec<u32>>);

    /// The whole protocol in memory: `drop_after_share` clients vanish before sending
    /// their masked input, `drop_after_mask` before answering the unmask step.
    fn run(
        n: usize,
        t: usize,
        drop_after_share: &[usize],
        drop_after_mask: &[usize],
    ) -> Result<Outcome> {
        let d = 50;
        let round = 7;
        let mut parties: Vec<Party> = (0..n)
            .map(|i| {
                let node = format!("c{i:03}");
                let (secrets, advert) = ClientSecrets::generate(&node).unwrap();
                let x: Vec<f32> = (0..d)
                    .map(|j| ((i * 31 + j * 7) % 19) as f32 / 10.0 - 0.9)
                    .collect();
                Party {
                    node,
                    secrets,
                    advert,
                    x: encode_fixed(&x, 8.0),
                    inbox: BTreeMap::new(),
                }
            })
            .collect();
        let u1: Vec<Advert> = parties.iter().map(|p| p.advert.clone()).collect();
        // Step 2, relayed by the coordinator (it only sees ciphertexts).
        let mut outboxes = Vec::new();
        for p in &parties {
            outboxes.push((
                p.node.clone(),
                share_keys(&p.node, &p.secrets, round, &u1, t)?,
            ));
        }
        for (from, out) in outboxes {
            for (to, ct) in out {
                parties
                    .iter_mut()
                    .find(|p| p.node == to)
                    .unwrap()
                    .inbox
                    .insert(from.clone(), ct);
            }
        }
        let u2 = u1.clone();
        // Step 3.
        let mut masked = BTreeMap::new();
        for (i, p) in parties.iter().enumerate() {
            if !drop_after_share.contains(&i) {
                masked.insert(p.node.clone(), mask(&p.node, &p.secrets, round, &u2, &p.x)?);
            }
        }
        let survivors: BTreeSet<String> = masked.keys().cloned().collect();
        // Step 4.
        let mut replies = Vec::new();
        for (i, p) in parties.iter().enumerate() {
            if survivors.contains(&p.node) && !drop_after_mask.contains(&i) {
                replies.push(unmask(
                    &p.node, &p.secrets, round, &u2, &p.inbox, &survivors,
                )?);
            }
        }
        let sum = recover(round, &u2, &masked, &replies, t, d)?;
        let mut plain = vec![0u32; d];
        for p in parties.iter().filter(|p| survivors.contains(&p.node)) {
            plain
                .iter_mut()
                .zip(&p.x)
                .for_each(|(s, v)| *s = s.wrapping_add(*v));
        }
        Ok((sum, plain, masked))
    }

    #[test]
    fn the_sum_of_survivors_is_recovered_with_30_percent_dropped() {
        let (sum, plain, _) = run(10, 6, &[1, 4, 8], &[2]).unwrap();
        assert_eq!(sum, plain);
        let (sum, plain, _) = run(5, 3, &[], &[]).unwrap();
        assert_eq!(sum, plain);
        let f = decode_fixed(&plain);
        assert!(f.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn too_few_answers_cannot_unmask() {
        let e = run(10, 8, &[1, 4, 8], &[]).unwrap_err().to_string();
        assert!(e.contains("needed"), "{e}");
    }

    #[test]
    fn the_coordinator_only_holds_masked_vectors() {
        let (_, _, masked) = run(6, 4, &[], &[]).unwrap();
        // Each masked vector is indistinguishable from uniform: it matches its fixed-point
        // input almost nowhere, and its values spread over the whole 32-bit range.
        for (node, y) in &masked {
            let i: usize = node[1..].parse().unwrap();
            let x: Vec<f32> = (0..50)
                .map(|j| ((i * 31 + j * 7) % 19) as f32 / 10.0 - 0.9)
                .collect();
            let x = encode_fixed(&x, 8.0);
            let equal = x.iter().zip(y).filter(|(a, b)| a == b).count();
            assert!(equal <= 1, "{node}: {equal} coordinates in the clear");
            let high = y.iter().filter(|&&v| v > u32::MAX / 2).count();
            assert!(
                (10..=40).contains(&high),
                "{node}: {high}/50 in the upper half"
            );
            let decoded = decode_fixed(y);
            let dist: f64 = decoded
                .iter()
                .zip(&decode_fixed(&x))
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>()
                / 50.0;
            assert!(dist > 1000.0, "{node}: mean distance {dist}");
        }
    }

    #[test]
    fn a_client_refuses_to_reveal_both_kinds_or_unknown_survivors() {
        let (secrets, advert) = ClientSecrets::generate("a").unwrap();
        let survivors: BTreeSet<String> = ["a".to_string(), "z".to_string()].into();
        let e = unmask("a", &secrets, 1, &[advert], &BTreeMap::new(), &survivors)
            .unwrap_err()
            .to_string();
        assert!(e.contains("never shared"), "{e}");
        assert!(max_sum_terms(8.0) >= 4000);
    }

    #[test]
    fn client_rounds_refuse_what_could_reveal_an_update() {
        assert_eq!(threshold(2.0 / 3.0, 9), 6);
        assert_eq!(threshold(0.1, 10), 6);
        assert_eq!(threshold(0.9, 2), 2);
        let mk = |n: &str, v: u32| ClientRound::new(n, 3, vec![v; 4]).unwrap();
        let (mut a, aa) = mk("a", 1);
        let (mut b, ab) = mk("b", 2);
        let (mut c, ac) = mk("c", 3);
        let all = vec![aa.clone(), ab.clone(), ac.clone()];
        let weak = ShareKeysTask {
            threshold: 1,
            participants: all.clone(),
        };
        assert!(
            a.share_keys(&weak)
                .unwrap_err()
                .to_string()
                .contains("majority")
        );
        let task = ShareKeysTask {
            threshold: 2,
            participants: all.clone(),
        };
        let replies: BTreeMap<String, ShareKeysReply> = [
            ("a".to_string(), a.share_keys(&task).unwrap()),
            ("b".to_string(), b.share_keys(&task).unwrap()),
            ("c".to_string(), c.share_keys(&task).unwrap()),
        ]
        .into();
        // Same request, same answer; another participant list is refused.
        assert_eq!(a.share_keys(&task).unwrap(), replies["a"]);
        let other = ShareKeysTask {
            threshold: 2,
            participants: vec![aa.clone(), ab.clone()],
        };
        assert!(a.share_keys(&other).is_err());
        let inboxes = route(&replies);
        let masked = |r: &mut ClientRound, n: &str| {
            r.masked_input(&MaskedInputTask {
                participants: all.clone(),
                inbox: inboxes[n].clone(),
            })
            .unwrap()
        };
        let ya = masked(&mut a, "a");
        let yb = masked(&mut b, "b");
        // c drops. Survivors {a, b}: unmask reveals b-shares of a, b and the s-share of c.
        let survivors: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let ra = a
            .unmask(&UnmaskTask {
                survivors: survivors.clone(),
            })
            .unwrap();
        let rb = b
            .unmask(&UnmaskTask {
                survivors: survivors.clone(),
            })
            .unwrap();
        // Asking a again with c among the survivors would reveal c's self-mask share as
        // well as its mask-key share: refused.
        let e = a
            .unmask(&UnmaskTask {
                survivors: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let held = BTreeMap::from([("a".to_string(), ya), ("b".to_string(), yb)]);
        let sum = recover(3, &all, &held, &[ra, rb], 2, 4).unwrap();
        assert_eq!(sum, vec![3u32; 4]);
        // Too few survivors: refused before anything is revealed.
        let (mut d, ad) = mk("d", 1);
        let (mut e2, ae) = mk("e", 1);
        let (mut f, af) = mk("f", 1);
        let all = vec![ad, ae, af];
        let task = ShareKeysTask {
            threshold: 2,
            participants: all.clone(),
        };
        let replies: BTreeMap<String, ShareKeysReply> = [
            ("d".to_string(), d.share_keys(&task).unwrap()),
            ("e".to_string(), e2.share_keys(&task).unwrap()),
            ("f".to_string(), f.share_keys(&task).unwrap()),
        ]
        .into();
        let inboxes = route(&replies);
        d.masked_input(&MaskedInputTask {
            participants: all.clone(),
            inbox: inboxes["d"].clone(),
        })
        .unwrap();
        let e = d
            .unmask(&UnmaskTask {
                survivors: ["d".to_string()].into(),
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("needed"), "{e}");
    }
}
