// Node names (docs/protocol.md "Node names"; the same rule as scalepub/nodes.py): the readable
// name is the node id. A name the publisher refuses could never have entries, so the client
// says so at once instead of waiting for a node that will not exist.

export const MAX_NODE_BYTES = 255;
// C0 controls, DEL and C1 controls, U+2028/U+2029, lone surrogates (with the u flag a pair is
// one code point and does not match), noncharacters.
const NONCHARS = Array.from({ length: 17 }, (_, plane) => {
  const base = plane * 0x10000;
  return `\\u{${(base + 0xfffe).toString(16)}}\\u{${(base + 0xffff).toString(16)}}`;
}).join('');
const FORBIDDEN = new RegExp(`[\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029\\ud800-\\udfff\\ufdd0-\\ufdef${NONCHARS}]`, 'u');

/** Why `node` is not a valid node name, or null if it is. */
export function invalidNodeReason(node) {
  if (typeof node !== 'string') return `must be a string, got ${typeof node}`;
  if (!node.startsWith('/') || node === '/') return 'must start with / and name something, e.g. /app/Model or /app/Model/key';
  const bad = FORBIDDEN.exec(node);
  if (bad) {
    const code = bad[0].codePointAt(0).toString(16).toUpperCase().padStart(4, '0');
    return `character U+${code} at position ${bad.index} (a control, separator, surrogate or noncharacter; XML cannot carry it unchanged)`;
  }
  const size = new TextEncoder().encode(node).length;
  if (size > MAX_NODE_BYTES) return `${size} bytes of UTF-8, more than ${MAX_NODE_BYTES}`;
  return null;
}
