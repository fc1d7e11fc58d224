-- Cross-node routing: where each node's HTTP ingress is reachable by the other nodes
-- (`ip:port`, sent by the agent at join and with every heartbeat). Null until the agent
-- reports one; the pods of such a node answer 503 on the other nodes' ingresses.
ALTER TABLE nodes ADD COLUMN ingress_addr text;
