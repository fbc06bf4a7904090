"""Level 5: the main job end to end: a mission from the lead's file to a student anyone can pull.

- ``book``: the missions this peer knows (signed by their lead, verified), their prompts, cancels, and who
  announces which row sets
- ``leases``: shard leases on the DHT: who samples which shard, and whose result counts
- ``shaking``: the daemon's shaking loop (lease a shard, shake it, publish), and each mission's progress
- ``replication``: row sets kept, copied to other peers, taken from them, and dropped when they lose
- ``training``: one supervised trainer worker per mission this peer trains
- ``checkpoints``: the trainers' checkpoints announced, served and pulled
- ``vouching``: the lead's countersignature on its missions' checkpoints
- ``students``: a mission's student published as the swarm's model ``mission:<id>``, listed, pulled on first use
- ``feedback``: the owner's accept / redo / edit of the answers they got, as preference pairs and prompts
"""
