# tvgate.hcl: what a tvgate gateway may do in Vault (or OpenBao). Nothing else.
# Rendered by `tvgate vault policy gateway` for mount "transit" and transit key "tvgate";
# `tvgate vault setup` writes it as policy "tvgate" and gives it to AppRole role "tvgate".

# Encrypt and decrypt provider keys with its own derived transit key. Every request
# carries the key's context (org, key id, owner), so a ciphertext copied onto another
# key row, user or org does not decrypt.
path "transit/encrypt/tvgate" { capabilities = ["update"] }
path "transit/decrypt/tvgate" { capabilities = ["update"] }

# Move stored ciphertexts to the newest key version after a rotation (tvgate keys
# rewrap). Vault rewraps without ever returning the plaintext.
path "transit/rewrap/tvgate" { capabilities = ["update"] }

# Its own token only: look up its TTL, renew it before it expires.
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }

# Never the key itself: no reading its configuration, no export, no backup, no
# rotation, no other transit key. (Not granted is already denied; these rules keep it
# denied even if a broader policy is ever attached to the same token.)
path "transit/keys/*" { capabilities = ["deny"] }
path "transit/export/*" { capabilities = ["deny"] }
path "transit/backup/*" { capabilities = ["deny"] }
