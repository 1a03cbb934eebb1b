import { Strophe } from 'strophe.js';
import { PubSubClient } from './client.js';

PubSubClient.Strophe = Strophe;

export { PubSubClient, Strophe };
export { fromService, bareJid } from './client.js';
export { parseBatch, parseEntries, entriesFromHistory, batchesOfMessage, NS_BATCH } from './batch.js';
export { Orderer } from './order.js';
export { fetchRange, fetchHistoryPage } from './history.js';
export { invalidNodeReason, MAX_NODE_BYTES } from './nodes.js';
