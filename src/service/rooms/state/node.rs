//! The nodes of the state trie and their byte encoding: a leaf holds up to [`LEAF_MAX`]
//! `(short state key, short event)` pairs sorted by key; a branch holds up to sixteen children
//! chosen by the next four bits of the key's hash. Numbers are varints, so a node of a room's
//! state takes a few hundred bytes at most.

/// Most entries in a leaf before it splits into a branch.
pub const LEAF_MAX: usize = 16;
/// Deepest level: 64 hash bits, four per level.
pub const MAX_LEVEL: u32 = 16;

/// The hash that places a short state key in the trie. Short keys are handed out in sequence,
/// so they are mixed (a bijection, so two keys never share a whole hash) to spread them evenly.
pub fn hash(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The four bits of `hash` that choose the child at `level`.
pub fn nibble(hash: u64, level: u32) -> u8 {
    ((hash >> (60 - 4 * level.min(15))) & 0xF) as u8
}

/// A node of the trie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Entries sorted by short state key.
    Leaf(Vec<(u64, u64)>),
    /// Children by nibble.
    Branch(Slot),
}

/// A branch's children: a bitmap of the nibbles present and their node ids in nibble order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    bitmap: u16,
    children: Vec<u64>,
}

impl Slot {
    fn index(&self, nibble: u8) -> usize {
        (self.bitmap & ((1u16 << nibble) - 1)).count_ones() as usize
    }

    /// The child at `nibble`.
    pub fn child(&self, nibble: u8) -> Option<u64> {
        (self.bitmap & (1 << nibble) != 0).then(|| self.children[self.index(nibble)])
    }

    /// Sets (or with 0, removes) the child at `nibble`.
    pub fn set(&mut self, nibble: u8, child: u64) {
        let index = self.index(nibble);
        let present = self.bitmap & (1 << nibble) != 0;
        match (present, child) {
            (true, 0) => {
                self.children.remove(index);
                self.bitmap &= !(1 << nibble);
            }
            (true, child) => self.children[index] = child,
            (false, 0) => {}
            (false, child) => {
                self.children.insert(index, child);
                self.bitmap |= 1 << nibble;
            }
        }
    }

    /// Whether no child is left.
    pub fn is_empty(&self) -> bool {
        self.bitmap == 0
    }

    /// Every child's id.
    pub fn children(&self) -> impl Iterator<Item = u64> + '_ {
        self.children.iter().copied()
    }
}

const LEAF: u8 = 0;
const BRANCH: u8 = 1;

impl Node {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Node::Leaf(entries) => {
                out.push(LEAF);
                put_varint(&mut out, entries.len() as u64);
                for (key, event) in entries {
                    put_varint(&mut out, *key);
                    put_varint(&mut out, *event);
                }
            }
            Node::Branch(slot) => {
                out.push(BRANCH);
                out.extend_from_slice(&slot.bitmap.to_le_bytes());
                for child in &slot.children {
                    put_varint(&mut out, *child);
                }
            }
        }
        out
    }

    /// Reads stored bytes back.
    pub fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let (&tag, mut rest) = bytes.split_first().ok_or("empty")?;
        match tag {
            LEAF => {
                let count = get_varint(&mut rest)?;
                let count = usize::try_from(count).map_err(|_| "count")?;
                let mut entries = Vec::with_capacity(count.min(4 * LEAF_MAX));
                for _ in 0..count {
                    entries.push((get_varint(&mut rest)?, get_varint(&mut rest)?));
                }
                Ok(Node::Leaf(entries))
            }
            BRANCH => {
                let bitmap = rest.get(..2).ok_or("short branch")?;
                let bitmap = u16::from_le_bytes([bitmap[0], bitmap[1]]);
                rest = &rest[2..];
                let children = (0..bitmap.count_ones())
                    .map(|_| get_varint(&mut rest))
                    .collect::<Result<_, _>>()?;
                Ok(Node::Branch(Slot { bitmap, children }))
            }
            _ => Err("unknown node kind"),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Result<u64, &'static str> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or("truncated")?;
        *bytes = rest;
        value |= u64::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long")
}
