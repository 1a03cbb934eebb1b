// Browser bundle entry: window.ScalePub = { PubSubClient }.
import { PubSubClient } from './index.js';

export { PubSubClient };
