-- Argo CD health check for connbudget.io/ConnectionBudget.
-- Install it under resource.customizations.health.connbudget.io_ConnectionBudget in argocd-cm.
-- Healthy means the controller works (Ready=True); being over budget is not a health problem of
-- the ConnectionBudget object, so Argo CD health does not flap with traffic.
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator's first probe"
  return hs
end
if obj.metadata ~= nil and obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to see the latest spec"
  return hs
end
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    if condition.status == "True" then
      if obj.status.phase == "Paused" then
        hs.status = "Suspended"
        hs.message = "Actions are paused by the connbudget.io/paused annotation"
      else
        hs.status = "Healthy"
        hs.message = condition.message or ""
      end
      return hs
    end
    if condition.reason == "Pending" then
      hs.status = "Progressing"
    else
      hs.status = "Degraded"
    end
    hs.message = (condition.reason or "") .. ": " .. (condition.message or "")
    return hs
  end
end
hs.status = "Progressing"
hs.message = "No Ready condition yet"
return hs
